"""The `prepare` stage: corpus -> token shards + manifest and the offline lm-eval tasks, in storage.

    data = prepare_data(settings, storage, tracker)

The tokenizer is `tokenizer.name`, or the pretrained teacher's own ("teacher", SPEC §8): then the
teacher is obtained (a GGUF converted once into storage) before the corpus is tokenized.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocomix_core.data.unigram import unigram_perplexity
from cocomix_core.plumbing.keys import cache_key
from cocomix_core.plumbing.storage import Storage
from settings import ExperimentSettings

if TYPE_CHECKING:  # mlflow loads inside the steps that log
    from cocomix_core.plumbing.tracking import MlflowTracker

TASKS_DIR = "lm_tasks"  # the offline lm-eval tasks, inside the prepared data folder
UNIGRAM_METRIC = "data/unigram_val_ppl"


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Token shards and offline tasks in storage."""

    key: str
    uri: str
    digest: str
    source: str  # the corpus it was prepared from
    splits: dict[str, dict[str, int]]  # per split: documents and tokens (the manifest's)
    note: str
    unigram_ppl: float  # the validation split's unigram perplexity from train counts (data/unigram.py)

    def floor_metrics(self) -> dict[str, float]:
        """The unigram floor as a tracker metric (logged to the prepare run and the parent run)."""
        return {UNIGRAM_METRIC: self.unigram_ppl}

    def folder(self, storage: Storage) -> Path:
        """A local folder holding the prepared data."""
        return storage.materialize(self.key)

    def log_to(self, tracker: MlflowTracker) -> None:
        """Record the prepared corpus as a dataset input of the tracker's run, identified by its digest."""
        from cocomix_core.plumbing.tracking import log_dataset_input

        log_dataset_input(
            tracker.run_id, name=f"corpus:{self.source}", digest=self.digest, source=self.uri,
            profile={"splits": self.splits}, tracking_uri=tracker.client.tracking_uri,
        )


def prepare_data(settings: ExperimentSettings, storage: Storage, tracker: MlflowTracker) -> PreparedData:
    """Corpus -> token shards + manifest and the offline lm-eval tasks, in storage (reused when already there)."""
    from cocomix_core.data import corpus

    tokenizer = data_tokenizer_for(settings, storage)
    key = cache_key("data", settings.data.model_dump(mode="json"), settings.tokenizer.name, tokenizer.digest)
    with storage.stored_folder(key) as folder:
        reused = storage.exists(key)
        manifest = prepare_folder(settings, folder, tokenizer)
        unigram_ppl = unigram_perplexity(corpus.load_split(folder, "train"), corpus.load_split(folder, "val"),
                                         tokenizer.vocab_size)
    digest = corpus.data_digest(manifest)
    split_tokens = {split: counts["tokens"] for split, counts in manifest["splits"].items()}
    uri = storage.uri(key)
    tokens = ", ".join(f"{tokens:,} {split}" for split, tokens in split_tokens.items())
    note = (f"data already prepared at {uri} (digest {digest[:12]}…), reused" if reused
            else f"prepared {tokens} tokens at {uri} (digest {digest[:12]}…)")
    note += f"; unigram floor: validation perplexity {unigram_ppl:.4g}"
    result = PreparedData(key=key, uri=uri, digest=digest, source=manifest["source"], splits=manifest["splits"],
                          note=note, unigram_ppl=unigram_ppl)
    tracker.log_metrics({f"data/{split}_tokens": tokens for split, tokens in split_tokens.items()}, step=0)
    tracker.log_metrics(result.floor_metrics(), step=0)
    result.log_to(tracker)
    return result


def prepare_folder(settings: ExperimentSettings, folder: str | Path, tokenizer: Any) -> dict[str, Any]:
    """Tokenize the corpus into `folder` and build the offline lm-eval tasks beside it; returns the manifest.

    What `prepare_data` does inside storage and the data command line does into any folder, so both honour the
    same settings and give the same manifest.
    """
    from cocomix_core.data import corpus
    from cocomix_core.evaluation import offline_tasks

    manifest = corpus.prepare_corpus(settings.data, folder, tokenizer)
    offline_tasks.build_offline_tasks(
        folder, Path(folder) / TASKS_DIR, settings.data.offline_task_items, settings.data.split_seed, tokenizer
    )
    return manifest


def data_tokenizer_for(settings: ExperimentSettings, storage: Storage) -> Any:
    """The tokenizer the data is prepared with (`tokenizer.name`; "teacher": the pretrained teacher's own)."""
    from cocomix_core.data.tokenizer import TEACHER_NAME, load_tokenizer

    if settings.tokenizer.name != TEACHER_NAME:
        return load_tokenizer(settings.tokenizer.name)
    # Imported here: torch loads only when the data is tokenized with the teacher's own tokenizer.
    from cocomix_core.concepts.teachers import pretrained_folder

    return load_tokenizer(TEACHER_NAME, pretrained_folder(settings.teacher.pretrained, storage))
