"""The result at the end of a run: who won, by how much, and the exact commands to look further.

Input is the content of the report's `report.json` (its `table` and `verdict`; see
report.py) and where the run's records live (`RunLinks`). `result_text` is what the flow's `end`
step prints; `description_markdown` is the parent MLflow run's description (its note).

The verdict is the report's own (`report.json`'s "verdict": every arm against NTP, the paired
difference's 95% interval and the claim it allows, each arm's own interval, the smallest detectable
difference, and a pointer to `cpu_study` when the students are still at the unigram level), with the
unigram floor beside it, so the console, the card and the MLflow note say the same.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

from cocomix_core.plumbing.keys import EXPERIMENT_RUN_TAG
from cocomix_core.reporting.report import floor_text
from settings.schema import ExperimentSettings, training_branches

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


@dataclass(frozen=True)
class RunLinks:
    """Where one flow run's records live: its MLflow store, experiment and runs, and its report card."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    branch_run_ids: dict[str, str]
    flow_file: str  # the flow's file as the user runs it, e.g. flows/cocomix_flow.py
    card_pathspec: str  # <Metaflow run id>/report, or <run id>/report/<task id>
    card_id: str = "report"


def ui_base_url(tracking_uri: str) -> str:
    """The MLflow UI for this store: the tracking server itself, or a local `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def mlflow_ui_command(tracking_uri: str) -> str | None:
    """The command that serves a file-based store's UI at LOCAL_UI; None for a tracking server (it serves its own)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --port {LOCAL_UI.rsplit(':', 1)[1]}"


def run_url(links: RunLinks) -> str:
    """The parent run's page in the MLflow UI (its curves of every branch, report and description)."""
    return f"{ui_base_url(links.tracking_uri)}/#/experiments/{links.experiment_id}/runs/{links.parent_run_id}"


def branch_chart_url(links: RunLinks) -> str:
    """The experiment's runs in the MLflow 3 "Model training" view (not the GenAI one it opens by default), as
    charts, listing only this run's branch runs: found by their experiment-run tag, they show at the top level
    (their parent is not in the list), so each chart, `by_tokens/eval/val_ppl` first, draws one line per branch."""
    search = f"tags.`{EXPERIMENT_RUN_TAG}` = '{links.parent_run_id}'"
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART",
                                    "searchFilter": search}, quote_via=urllib.parse.quote)
    return f"{ui_base_url(links.tracking_uri)}/#/experiments/{links.experiment_id}/runs?{query}"


def card_view_command(links: RunLinks) -> str:
    """The Metaflow command that opens the report card in a browser."""
    return f"python {links.flow_file} card view {links.card_pathspec} --id {links.card_id}"


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def branch_table(table: list[dict[str, Any]]) -> list[str]:
    """Fixed-width lines: one row per branch with its final tokens and val ppl."""
    rows = [["branch", "kind", "seed", "λ", "tokens", "final val ppl", "best val ppl"]]
    for row in table:
        rows.append([row["branch"], row["kind"], _number(row.get("seed")), _number(row.get("lam_concept")),
                     _number(row.get("final_tokens")), _number(row.get("final_val_ppl")),
                     _number(row.get("best_val_ppl"))])
    return _columns(rows)


def verdict_lines(report: Mapping[str, Any]) -> list[str]:
    """The report's verdict (every arm against NTP, with intervals and a claim; see report.verdict_text)."""
    return list(report["verdict"]) or ["no arm to compare with the NTP baseline"]


def next_commands(links: RunLinks) -> list[str]:
    """The commands (and the link) to open this run's records."""
    lines = []
    if (command := mlflow_ui_command(links.tracking_uri)) is not None:
        lines.append(f"  {command}")
    lines += [
        f"  then open {branch_chart_url(links)}   (every branch on one chart per metric, against training tokens)",
        f"  this run: {run_url(links)}   (report, description)",
        f"  checkpoints: {ui_base_url(links.tracking_uri)}/#/experiments/{links.experiment_id}/models"
        "?workflowType=machine_learning   (each an MLflow model with its eval metrics)",
        f"  {card_view_command(links)}   (the report card)",
    ]
    return lines


def result_text(report: Mapping[str, Any], links: RunLinks) -> str:
    """What the flow's `end` step prints: the branch table, the report's verdict, and the next commands."""
    parts = ["Result", "", *branch_table(report["table"]), "", "Verdict (95% intervals):",
             *(f"  {line}" for line in verdict_lines(report)), f"  {floor_text(report.get('unigram_ppl'))}", "",
             "Look further:", *next_commands(links)]
    return "\n".join(parts) + "\n"


def settings_summary(settings: ExperimentSettings) -> str:
    """One line of the settings that decide what a result means: preset, tokens per branch, branches, teacher, eval."""
    train = settings.train
    tokens = train.steps * train.batch_size * settings.data.block_size
    branches = ", ".join(branch.name for branch in training_branches(settings))
    teacher = settings.teacher.pretrained or "trained {width}×{depth}".format(**settings.teacher.model.model_dump())
    limit = f", {settings.eval.limit} items each" if settings.eval.limit else ""
    return (f"preset {settings.preset}; {train.steps:,} steps × {train.batch_size} × {settings.data.block_size} tokens "
            f"= {tokens:,} tokens per branch; branches {branches}; teacher {teacher}; "
            f"SAE {settings.sae.pretrained or f'{settings.sae.num_latents:,} latents, k={settings.sae.k}'}; "
            f"eval {', '.join(settings.eval.tasks)}{limit}")


def description_markdown(report: Mapping[str, Any], settings_summary: str) -> str:
    """The parent MLflow run's description: the settings in brief and the result, as Markdown."""
    verdict = "\n".join(f"- {line}" for line in verdict_lines(report))
    table = "\n".join(branch_table(report["table"]))
    floor = floor_text(report.get("unigram_ppl"))
    return (f"**Settings**: {settings_summary}\n\n**Verdict**\n\n{verdict}\n\n{floor}\n\n"
            f"**Branches**\n\n```\n{table}\n```\n")
