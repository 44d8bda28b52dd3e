"""The two CPU memory regimes the step-time benchmarks compare, each in its own process.

keep:  freed memory is reused (`keep_freed_memory`), as `train()` and the flow do on CPU by default
unmap: glibc's default: tensors over 32 MB are unmapped on free and page-faulted back on reuse

mallopt cannot be undone, so `--allocator both` (the default) reruns the benchmark once per regime.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from cocomix_core.training.trainer import keep_freed_memory

REGIMES = ("keep", "unmap")


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """Add --allocator {both,keep,unmap} to a benchmark's command line."""
    parser.add_argument("--allocator", choices=["both", *REGIMES], default="both",
                        help="keep: reuse freed memory as train() does on CPU; unmap: glibc's default; "
                             "both: each in a fresh process, one after the other")


def enter_regime(args: argparse.Namespace, module: str) -> bool:
    """Set this process's regime and print it; for `both`, run `module` once per regime and return False."""
    if args.allocator == "both":
        for regime in REGIMES:  # argparse keeps the last --allocator given
            subprocess.run([sys.executable, "-m", module, *sys.argv[1:], "--allocator", regime], check=True)
        return False
    applied = args.allocator == "keep" and keep_freed_memory()
    detail = f"mallopt applied: {applied}" if args.allocator == "keep" else "glibc default"
    print(f"\n#### allocator: {args.allocator} freed memory ({detail})", flush=True)
    return True
