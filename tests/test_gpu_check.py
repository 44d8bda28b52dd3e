"""benchmarks/gpu_check.sh --cpu: every check runs or says why not, and the speed lines carry real numbers."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_cpu_gpu_check_prints_speeds_of_both_arms_and_their_ratio():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--steps", "2"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    speeds = {arm: float(value) for arm, value in re.findall(r"^tokens/s (ntp|cocomix): ([0-9.]+)", out, re.M)}
    assert speeds.keys() == {"ntp", "cocomix"} and all(value > 0 for value in speeds.values()), out
    ratio = float(re.search(r"^step ratio cocomix/ntp: ([0-9.]+)", out, re.M).group(1))
    assert math.isfinite(ratio) and ratio > 0
    mfus = [float(value) for value in re.findall(r"MFU ([0-9.]+)$", out, re.M)]
    assert len(mfus) == 2 and all(0 < value < 1 for value in mfus), out
    # The GPU-only checks are skipped with a reason, never silently.
    for name in ("fused AdamW", "SDPA flash kernel", "torch.compile"):
        assert re.search(rf"^SKIP {re.escape(name)}: needs a CUDA device", out, re.M), name
    assert re.search(r"^summary: 4 passed, 0 failed, 3 skipped", out, re.M), out
