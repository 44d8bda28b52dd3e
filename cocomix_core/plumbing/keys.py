"""Names of stored products and MLflow params: what a cached product is keyed by, where a branch trains."""

from __future__ import annotations

from typing import Any

from cocomix_core.plumbing.files import sha256_json
from settings import Branch, ExperimentSettings, flat_params

# On each branch run and checkpoint model: the flow run's parent MLflow run, so one UI link or search finds them.
EXPERIMENT_RUN_TAG = "cocomix.experiment_run"


def cache_key(kind: str, *parts: Any) -> str:
    """A storage key for a cached product: its kind plus a digest of everything it is computed from."""
    return f"{kind}/{sha256_json(parts)[:16]}"


def run_folder_key(experiment_id: str, branch_name: str) -> str:
    """Where a branch trains: one folder per experiment (a run and its resumes share it) and branch."""
    return f"runs/{experiment_id}/{branch_name}"


def section_params(settings: ExperimentSettings, *sections: str) -> dict[str, str]:
    """The flat settings of some top-level sections, as MLflow params."""
    return {key: value for key, value in flat_params(settings).items() if key.split(".", 1)[0] in sections}


def branch_params(settings: ExperimentSettings, branch: Branch) -> dict[str, str]:
    """The branch's own settings (its arm, seed, λ) as params of its MLflow run."""
    prefix = f"arms.{branch.arm}."
    arm = {f"arm.{key.removeprefix(prefix)}": value for key, value in section_params(settings, "arms").items()
           if key.startswith(prefix)}
    return arm | {f"branch.{key}": str(value) for key, value in branch.model_dump().items()}
