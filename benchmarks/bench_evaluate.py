"""Evaluation throughput at the `cpu` preset's shapes: validation perplexity and each offline lm-eval task.

Run from the repo root: python -m benchmarks.bench_evaluate   (random-init NTP and CoCoMix models, fp32, 2 threads)

tokens/s counts the tokens fed through the model: windows × block_size for perplexity; for a task,
every request's context + answer tokens, truncated to block_size as lm-eval does (all choices of a
multiple-choice item; a rolling passage once). Task times are end to end (lm-eval's dataset loading
and bookkeeping included), as a checkpoint evaluation pays them.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cocomix_core.data.corpus import load_split, prepare_corpus
from cocomix_core.data.tokenizer import hf_gpt2_tokenizer
from cocomix_core.evaluation.evaluator import run_lm_eval, validation_perplexity
from cocomix_core.evaluation.offline_tasks import TASK_NAMES, build_offline_tasks
from cocomix_core.model.build import build_model
from settings.loader import load_settings


def task_tokens(tasks_dir: Path, task: str, limit: int | None, block_size: int, tokenizer) -> int:
    """Tokens the model reads for the first `limit` items of `task` (see the module docstring)."""
    items = [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()][:limit]
    if task == "cocomix_lastword":
        texts = [f"{item['context']} {item['target']}" for item in items]
    elif task == "cocomix_choice":
        texts = [f"{item['context']} {choice}" for item in items for choice in item["choices"]]
    else:
        return sum(len(tokenizer.encode(item["page"])) for item in items)
    return sum(min(len(tokenizer.encode(text)), block_size) for text in texts)


def timed(call) -> tuple[object, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    settings = load_settings("cpu")
    block, evals = settings.data.block_size, settings.eval
    tokenizer = hf_gpt2_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        prepare_corpus(settings.data, data_dir)
        tasks_dir = build_offline_tasks(data_dir, Path(scratch) / "tasks", settings.data.offline_task_items, seed=0)
        val_tokens = load_split(data_dir, "val")
        tokens = {task: task_tokens(tasks_dir, task, evals.limit, block, tokenizer) for task in TASK_NAMES}
        models = {
            arm.kind: build_model(arm.kind, arm.model, block, concept_dim=settings.sae.num_latents,
                                  concept_num=arm.concept_num, insert_layer_index=arm.insert_layer_index, seed=0)
            for arm in settings.arms.values()
        }
        run_lm_eval(models["ntp"], tokenizer, [TASK_NAMES[0]], tasks_dir, 2, evals.batch_size)  # warm up lm-eval
        print(f"cpu preset: block {block}, eval batch {evals.batch_size}, {evals.val_windows} val windows, "
              f"limit {evals.limit} items/task, {torch.get_num_threads()} threads, fp32; "
              + ", ".join(f"{a.kind} width {a.model.width} depth {a.model.depth}" for a in settings.arms.values()))
        # NTP and CoCoMix run back to back per measurement, so they share whatever else loads the CPU.
        windows = min(evals.val_windows, len(val_tokens) // block)
        for kind, model in models.items():
            _, seconds = timed(lambda: validation_perplexity(model, val_tokens, block, windows, evals.batch_size))
            report(kind, "perplexity", windows * block, seconds)
        for task in TASK_NAMES:
            for kind, model in models.items():
                _, seconds = timed(lambda: run_lm_eval(model, tokenizer, [task], tasks_dir, evals.limit, evals.batch_size))
                report(kind, task, tokens[task], seconds)


def report(kind: str, measurement: str, tokens: int, seconds: float) -> None:
    print(f"{kind:8s} {measurement:17s} {tokens:7d} tokens {seconds:7.2f} s {tokens / seconds:8.0f} tokens/s")


if __name__ == "__main__":
    main()
