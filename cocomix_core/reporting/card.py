"""The report in narrow pages (a Metaflow card): wide tables split, plots captioned in words."""

from __future__ import annotations

import re
from pathlib import Path


def split_wide_tables(markdown: str, max_columns: int) -> str:
    """Markdown with every table wider than `max_columns` split into tables of at most that many columns,
    each repeating the first (row label) column."""
    lines, output, index = markdown.split("\n"), [], 0
    while index < len(lines):
        if not _is_table_row(lines[index]):
            output.append(lines[index])
            index += 1
            continue
        table = []
        while index < len(lines) and _is_table_row(lines[index]):
            table.append(_cells(lines[index]))
            index += 1
        output.append(_split_table(table, max_columns))
    return "\n".join(output)


def _is_table_row(line: str) -> bool:
    return line.startswith("|") and line.rstrip().endswith("|")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _split_table(rows: list[list[str]], max_columns: int) -> str:
    """`rows` (header, separator, body) as one or more tables, the first column repeated in each."""
    header, _, *body = rows
    rest = list(range(1, len(header)))
    width = max(1, max_columns - 1)
    groups = [rest[start:start + width] for start in range(0, len(rest), width)] or [[]]
    tables = []
    for group in groups:
        columns = [0, *group]
        lines = ["| " + " | ".join(header[column] for column in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row[column] if column < len(row) else "" for column in columns) + " |"
                  for row in body]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


_METRIC_WORDS = {"val_ppl": "validation perplexity", "acc": "accuracy", "acc_norm": "length-normalised accuracy",
                 "ppl": "perplexity", "word_perplexity": "word perplexity", "bits_per_byte": "bits per byte",
                 "training_val_ppl": "validation perplexity during training"}


def plot_caption(plot: Path) -> str:
    """A caption for a report plot named after its metric (`cocomix_choice__acc.png` -> "cocomix_choice:
    accuracy by training tokens")."""
    *task, metric = plot.stem.split("__")
    words = _METRIC_WORDS.get(metric, re.sub(r"[_]+", " ", metric))
    return f"{task[0]}: {words} by training tokens" if task else f"{words.capitalize()} by training tokens"
