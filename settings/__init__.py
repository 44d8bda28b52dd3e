"""Typed experiment settings: presets, YAML files, dotted overrides, validation, digests."""

from settings.loader import (
    DEFAULT_PRESET,
    SettingsError,
    apply_overrides,
    dump_yaml,
    flat_params,
    load_settings,
    preset_names,
    settings_digest,
    validate_settings,
)
from settings.schema import (
    ArmSettings,
    Branch,
    ExperimentSettings,
    ModelShape,
    TrainSettings,
    training_branches,
)

__all__ = [
    "DEFAULT_PRESET",
    "ArmSettings",
    "Branch",
    "ExperimentSettings",
    "ModelShape",
    "SettingsError",
    "TrainSettings",
    "apply_overrides",
    "dump_yaml",
    "flat_params",
    "load_settings",
    "preset_names",
    "settings_digest",
    "training_branches",
    "validate_settings",
]
