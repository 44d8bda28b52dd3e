"""Command-line plumbing shared by every `python -m cocomix_core.*` entry point."""

from __future__ import annotations

import argparse

from settings.loader import DEFAULT_PRESET, load_settings
from settings.schema import ExperimentSettings


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--settings PRESET_OR_YAML` and repeated `--set dotted.key=value` options."""
    parser.add_argument("--settings", default=DEFAULT_PRESET, help="preset name or YAML file (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.lr=3e-4 (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> ExperimentSettings:
    """Load and validate the settings named by parsed `add_settings_arguments` options."""
    return load_settings(args.settings, args.overrides)
