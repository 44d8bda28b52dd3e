"""Concepts a person can look at (SPEC §11): concept cards, the students' concept prediction, steering.

    content = gather_concepts(cache, tokenizer, settings.concepts, overlap_curves, model, val_tokens)
    files = write_concepts(content, out_dir)       # concepts.md (card), concepts.html (self-contained), .json, plot

From the flow's `report` step (`concepts_stage`: the run's label cache, its CoCoMix branches'
overlap curves and the final CoCoMix checkpoint) or from the command line, for any teacher and
tokenizer:

    python -m cocomix_core.reporting.concepts_report SAE CHECKPOINT --data D --out O --teacher T
    python -m cocomix_core.reporting.concepts_report SAE CHECKPOINT --data D --out O --labels LABEL_CACHE

The command line labels `--samples` training windows and the validation windows (cards and
overlap from that pass) unless it is given a label cache the flow built.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from cocomix_core.concepts.cards import (
    CONTEXT_BEFORE,
    NO_TOKEN,
    ConceptCards,
    shown_latents,
)
from cocomix_core.plumbing.files import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cocomix_core.concepts.labels import ConceptFiles, LabelCache
    from settings.schema import ConceptSettings

SECTIONS = ("Concept cards", "Concept prediction", "Steering")
NEWLINE_MARK = "⏎"  # corpus newlines inside a one-line context


@dataclasses.dataclass(frozen=True)
class CardView:
    """One latent's card as text: its counts and its contexts (token pieces, the firing one at `highlight`)."""

    latent: int
    label_count: int
    frequency: float
    contexts: list[tuple[float, list[str]]]  # (activation, pieces); the firing token is pieces[highlight]
    highlight: int = CONTEXT_BEFORE


@dataclasses.dataclass(frozen=True)
class SteeringView:
    """One steered concept as text: the prompts, both generations, and the concept's predicted rate in each."""

    concept: int
    strength: float
    unsteered_rate: float
    steered_rate: float
    prompts: list[str]
    unsteered: list[str]
    steered: list[str]


@dataclasses.dataclass
class ConceptsContent:
    """Everything the three sections show; `notes` say why a section has nothing."""

    cards: list[CardView]
    overlap: dict[str, list[tuple[int, float]]]  # branch -> (training tokens, eval/concept_topk_overlap)
    floor: float | None  # the frequency predictor's overlap
    steering: list[SteeringView]
    steered_checkpoint: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)  # about the cards: why there are none, ids left out
    steering_note: str = ""  # why nothing was steered


@dataclasses.dataclass(frozen=True)
class ConceptsFiles:
    """What `write_concepts` wrote: the card's markdown, the HTML page, the JSON and the overlap plot (if any)."""

    markdown_path: Path
    html_path: Path
    json_path: Path
    plot: Path | None


# ----- gathering ------------------------------------------------------------------------------
def _readable(piece: str) -> str:
    return piece.replace("\r", "").replace("\n", NEWLINE_MARK)


def card_views(cards: ConceptCards, latents: Iterable[int], tokenizer: PreTrainedTokenizerBase) -> list[CardView]:
    """The cards of `latents`, each context decoded token by token (so the firing token can be marked)."""
    views = []
    for latent in latents:
        contexts = []
        for value, ids in cards.used_contexts(latent):
            pieces = [_readable(tokenizer.decode([int(i)])) if i != NO_TOKEN else "" for i in ids]
            contexts.append((value, pieces))
        views.append(CardView(latent=latent, label_count=int(cards.label_counts[latent]),
                              frequency=cards.frequency(latent), contexts=contexts))
    return views


def steering_views(model: Any, tokenizer: PreTrainedTokenizerBase, val_tokens: np.ndarray, concepts: Sequence[int],
                   options: ConceptSettings, k: int) -> list[SteeringView]:
    """Each concept steered on the fixed validation prompts (SPEC §7), as text."""
    from cocomix_core.concepts.steering import (
        fixed_prompts,
        prompt_and_new_tokens,
        steer,
    )

    prompt_length, new_tokens = prompt_and_new_tokens(model.config.n_positions)
    prompts = fixed_prompts(val_tokens, options.steer_prompts, prompt_length)
    views = []
    for result in steer(model, prompts, list(concepts), options.steer_strength, k, new_tokens):
        text = [[_readable(tokenizer.decode(ids)) for ids in texts] for texts in (prompts, result.unsteered, result.steered)]
        views.append(SteeringView(concept=result.concept, strength=result.strength, unsteered_rate=result.unsteered_rate,
                                  steered_rate=result.steered_rate, prompts=text[0], unsteered=text[1], steered=text[2]))
    return views


def gather_concepts(cache: ConceptFiles | None, tokenizer: PreTrainedTokenizerBase, options: ConceptSettings,
                    overlap: dict[str, list[tuple[int, float]]], model: Any = None,
                    val_tokens: np.ndarray | None = None, steered_checkpoint: str = "") -> ConceptsContent:
    """The three sections from a label cache (cards, floor), the overlap curves and a CoCoMix model to steer."""
    from cocomix_core.evaluation.concept_quality import frequency_overlap

    content = ConceptsContent(cards=[], overlap=overlap, floor=None, steering=[], steered_checkpoint=steered_checkpoint)
    cards = cache.cards() if cache is not None else None
    if cards is None:
        content.notes.append("no concept cards: no label cache with cards (concepts.label_source=online, or no "
                             "CoCoMix branch)")
        content.steering_note = "nothing steered: no concept cards to choose the concepts from"
        return content
    latents = shown_latents(cards, options.cards, options.show)
    ignored = [latent for latent in options.show if latent >= cards.num_latents]
    if ignored:
        content.notes.append(f"concepts.show ids {ignored} are not latents of this SAE ({cards.num_latents})")
    content.cards = card_views(cards, latents, tokenizer)
    val_labels = cache.val_labels()
    if val_labels is not None:
        content.floor = frequency_overlap(cards.label_counts, np.asarray(val_labels))
    if model is None:
        content.steering_note = "nothing steered: no CoCoMix checkpoint that mixes concepts (mix insert or add)"
    elif val_tokens is not None:
        steered = latents[: options.steer_concepts]
        content.steering = steering_views(model, tokenizer, val_tokens, steered, options, cache.k)
    return content


# ----- rendering ------------------------------------------------------------------------------
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&$])")


def markdown_text(text: str) -> str:
    """Corpus text as literal markdown: every character markdown or HTML would interpret is escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _context_markdown(pieces: list[str], highlight: int) -> str:
    before, token, after = "".join(pieces[:highlight]), pieces[highlight], "".join(pieces[highlight + 1:])
    return f"{markdown_text(before)}**〚{markdown_text(token)}〛**{markdown_text(after)}"


def _context_html(pieces: list[str], highlight: int) -> str:
    before, token, after = "".join(pieces[:highlight]), pieces[highlight], "".join(pieces[highlight + 1:])
    return f"{html.escape(before)}<mark>{html.escape(token)}</mark>{html.escape(after)}"


def _card_heading(card: CardView) -> str:
    return (f"Latent {card.latent}: chosen as a label {card.label_count:,} times, active on "
            f"{card.frequency:.2%} of tokens")


def _overlap_lines(content: ConceptsContent) -> list[str]:
    lines = [f"{branch}: {overlap:.3f} at {tokens:,} tokens" for branch, points in content.overlap.items()
             for tokens, overlap in points[-1:]]
    if content.floor is not None:
        lines.append(f"frequency predictor (the K most often chosen training labels): {content.floor:.3f}")
    return lines or ["no concept prediction measured (no CoCoMix branch with validation labels)"]


def _steering_intro(content: ConceptsContent) -> str:
    return content.steering_note or f"Greedy generations of {content.steered_checkpoint}, unsteered and steered:"


def _steering_header(view: SteeringView) -> str:
    return (f"Latent {view.concept} raised by {view.strength:g}: predicted at {view.unsteered_rate:.0%} of generated "
            f"tokens unsteered, {view.steered_rate:.0%} steered")


def to_markdown(content: ConceptsContent) -> str:
    """The three sections as markdown for the Metaflow card (corpus text escaped)."""
    parts = [f"## {SECTIONS[0]}", "", *[f"- {markdown_text(note)}" for note in content.notes], ""]
    for card in content.cards:
        parts += [f"**{_card_heading(card)}**", ""]
        parts += [f"{number}. ({value:.3g}) {_context_markdown(pieces, card.highlight)}"
                  for number, (value, pieces) in enumerate(card.contexts, 1)] + [""]
    parts += [f"## {SECTIONS[1]}", "", "Mean share of a validation token's K labels among the student's K largest "
              "concept logits (final checkpoint):", ""]
    parts += [f"- {markdown_text(line)}" for line in _overlap_lines(content)] + ["", f"## {SECTIONS[2]}", ""]
    parts += [markdown_text(_steering_intro(content)), ""]
    for view in content.steering:
        parts += [f"**{_steering_header(view)}**", ""]
        for prompt, plain, steered in zip(view.prompts, view.unsteered, view.steered):
            parts += [f"- prompt: {markdown_text(prompt)}", f"  - unsteered: {markdown_text(plain)}",
                      f"  - steered: {markdown_text(steered)}"]
        parts.append("")
    return "\n".join(parts)


def to_html(content: ConceptsContent, plot: Path | None) -> str:
    """A self-contained page: the three sections, the plot inlined, every corpus string escaped."""
    body = [f"<h1>Concepts</h1><h2>{SECTIONS[0]}</h2>"]
    body += [f"<p class='note'>{html.escape(note)}</p>" for note in content.notes]
    for card in content.cards:
        items = "".join(f"<li><span class='act'>{value:.3g}</span> {_context_html(pieces, card.highlight)}</li>"
                        for value, pieces in card.contexts)
        body.append(f"<section><h3>{html.escape(_card_heading(card))}</h3><ol>{items}</ol></section>")
    body.append(f"<h2>{SECTIONS[1]}</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _overlap_lines(content))
                + "</ul>")
    if plot is not None:
        body.append(f"<img alt='concept top-K overlap by training tokens' src='data:image/png;base64,"
                    f"{base64.b64encode(plot.read_bytes()).decode()}'>")
    body.append(f"<h2>{SECTIONS[2]}</h2><p>{html.escape(_steering_intro(content))}</p>")
    for view in content.steering:
        rows = "".join(f"<tr><td>{html.escape(prompt)}</td><td>{html.escape(plain)}</td><td>{html.escape(steered)}</td></tr>"
                       for prompt, plain, steered in zip(view.prompts, view.unsteered, view.steered))
        body.append(f"<h3>{html.escape(_steering_header(view))}</h3><table><tr><th>prompt</th><th>unsteered</th>"
                    f"<th>steered</th></tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:60em}mark{background:#fd6;font-weight:bold}li{font-family:monospace;"
             "white-space:pre-wrap}.act{color:#777}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:2px 6px;vertical-align:top}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Concepts</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def overlap_plot(content: ConceptsContent, path: Path) -> Path | None:
    """eval/concept_topk_overlap by training tokens, one line per branch, the frequency predictor as a floor."""
    if not content.overlap:
        return None
    # matplotlib loads only when there is a curve to draw
    from cocomix_core.reporting.report import plot_lines

    floor = None if content.floor is None else (content.floor, "frequency predictor")
    markers = {branch: {"marker": "o"} for branch in content.overlap}
    return plot_lines(content.overlap, markers, "top-K overlap", path, floor,
                      title="concept prediction on validation tokens")


def write_concepts(content: ConceptsContent, out_dir: str | Path) -> ConceptsFiles:
    """concepts.md, concepts.html, concepts.json and concept_overlap.png into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = overlap_plot(content, out_dir / "concept_overlap.png")
    files = ConceptsFiles(markdown_path=out_dir / "concepts.md", html_path=out_dir / "concepts.html",
                          json_path=out_dir / "concepts.json", plot=plot)
    write_json_atomic(files.json_path, dataclasses.asdict(content))
    for path, text in ((files.markdown_path, to_markdown(content)), (files.html_path, to_html(content, plot))):
        with atomic_path(path) as temp:
            temp.write_text(text, encoding="utf-8")
    return files


# ----- command line ---------------------------------------------------------------------------
def _label_cache(args: Any, settings: Any, val_windows: np.ndarray) -> LabelCache:
    """The label cache named by --labels, or one built into <out>/labels by a pass of --teacher over --samples."""
    from cocomix_core.concepts.labels import (
        ConceptExtractor,
        LabelCache,
        build_label_cache,
        load_teacher,
    )
    from cocomix_core.concepts.sae import load_sae
    from cocomix_core.data.corpus import training_windows

    if args.labels:
        return LabelCache(args.labels)
    teacher = args.teacher or settings.teacher.pretrained
    if not teacher:
        raise ValueError("--teacher is required (a HF name or folder) unless --labels names a label cache")
    extractor = ConceptExtractor(load_teacher(teacher), load_sae(args.sae), args.layer_index or settings.sae.layer_index)
    folder = build_label_cache(
        extractor, training_windows(args.data, settings.data), args.samples, settings.concepts.extract_batch_size,
        settings.concepts.labels_per_token, Path(args.out) / "labels", {"teacher": teacher, "sae": str(args.sae)},
        val_windows=val_windows,
    )
    return LabelCache(folder)


def concepts_from_checkpoint(args: Any, settings: Any) -> ConceptsFiles:
    """The command line's work: label cache, overlap of the checkpoint, cards and steering, written to --out."""
    from cocomix_core.data.corpus import data_tokenizer, load_split
    from cocomix_core.data.windows import validation_windows
    from cocomix_core.evaluation.concept_quality import checkpoint_overlap
    from cocomix_core.evaluation.evaluator import load_checkpoint
    from cocomix_core.training.checkpoints import checkpoint_info

    val_tokens = load_split(args.data, "val")
    val_windows = validation_windows(val_tokens, settings.data.block_size, settings.eval.val_windows)
    cache = _label_cache(args, settings, val_windows)
    model = load_checkpoint(args.checkpoint)
    if getattr(model.config, "concept_dim", None) != cache.concept_dim:
        raise ValueError(f"{args.checkpoint} predicts {getattr(model.config, 'concept_dim', None)} concepts, the "
                         f"labels have {cache.concept_dim}: the checkpoint was not trained on this SAE")
    overlap = {}
    if cache.val_labels() is not None:
        labels = np.asarray(cache.val_labels())
        windows = validation_windows(val_tokens, cache.block_size, len(labels))
        overlap[Path(args.checkpoint).name] = [(int(checkpoint_info(args.checkpoint).get("tokens_seen", 0)),
                                               checkpoint_overlap(model, windows, labels, settings.eval.batch_size))]
    steerable = model if model.config.mix in ("insert", "add") else None
    content = gather_concepts(cache, data_tokenizer(args.data).hf(), settings.concepts, overlap, steerable, val_tokens,
                              str(args.checkpoint))
    return write_concepts(content, args.out)


def main(argv: list[str] | None = None) -> None:
    """`python -m cocomix_core.reporting.concepts_report SAE CHECKPOINT --data D --out O`: the concepts page."""
    import argparse
    import sys

    from cocomix_core.data.corpus import DataError
    from cocomix_core.evaluation.offline_tasks import EvaluationError
    from settings.cli import add_settings_arguments, settings_from_args
    from settings.loader import SettingsError

    parser = argparse.ArgumentParser(description="Concept cards, concept prediction and steering of a CoCoMix checkpoint.")
    parser.add_argument("sae", help="the SAE file the labels come from (safetensors or OpenAI .pt)")
    parser.add_argument("checkpoint", help="a CoCoMix checkpoint folder (…/checkpoints/step_000064)")
    parser.add_argument("--data", required=True, help="prepared data folder (train.bin, val.bin, tokenizer)")
    parser.add_argument("--out", required=True, help="output folder: concepts.html, concepts.md, concepts.json")
    parser.add_argument("--teacher", help="HF name or folder of the teacher; default: the settings' teacher.pretrained")
    parser.add_argument("--labels", help="a label cache folder (with cards) instead of a new label pass")
    parser.add_argument("--samples", type=int, default=64, help="training windows of the label pass (default 64)")
    parser.add_argument("--layer-index", type=int, help="teacher block the SAE reads; default: sae.layer_index")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        files = concepts_from_checkpoint(args, settings_from_args(args))
    except (DataError, EvaluationError, SettingsError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(json.dumps({name: str(path) for name, path in dataclasses.asdict(files).items()}, indent=2))


if __name__ == "__main__":
    main()
