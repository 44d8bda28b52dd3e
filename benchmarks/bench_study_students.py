"""Training-step time of the default run's students against cpu_study's narrower ones, interleaved.

    python benchmarks/bench_study_students.py [--rounds 6]

One fp32 step (forward with the next-token loss, backward, AdamW) on a batch of 8 × 128 random ids
over SmolLM2's 49,152-token vocabulary, 1 thread. The four models take turns every round, so load
from other processes on a shared machine hits them alike; the medians and their ratios are printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from cocomix_core.model.build import job_for_branch
from settings import load_settings, training_branches

VOCAB = 49152  # SmolLM2's tokenizer: the default corpus's students
STUDENTS = {("cpu", "ntp"): "ntp", ("cpu_study", "ntp"): "ntp-s0",
            ("cpu", "cocomix"): "cocomix", ("cpu_study", "cocomix"): "cocomix-s0"}


def student(preset: str, branch_name: str) -> torch.nn.Module:
    settings = load_settings(preset)
    (branch,) = [branch for branch in training_branches(settings) if branch.name == branch_name]
    return job_for_branch(settings, branch, vocab_size=VOCAB).build_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {key: student(key[0], name) for key, name in STUDENTS.items()}
    optimizers = {key: torch.optim.AdamW(model.parameters(), lr=1e-3) for key, model in models.items()}
    ids = torch.randint(0, VOCAB, (8, 128))
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for round_index in range(args.rounds + 1):
        for key, model in models.items():
            started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad()
            if round_index:  # round 0 warms up
                seconds[key].append(time.perf_counter() - started)
    median = {key: sorted(values)[len(values) // 2] for key, values in seconds.items()}
    for (preset, arm), value in median.items():
        print(f"{preset:<10}{arm:<8}{value:8.3f} s/step {ids.numel() / value:8.0f} tokens/s "
              f"{sum(p.numel() for p in models[(preset, arm)].parameters()):>12,} parameters")
    for arm in ("ntp", "cocomix"):
        print(f"{arm}: cpu_study step / cpu step = {median[('cpu_study', arm)] / median[('cpu', arm)]:.2f}")


if __name__ == "__main__":
    main()
