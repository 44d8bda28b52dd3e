"""Load settings from a preset name or YAML file plus dotted overrides, flatten and digest them."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Hashable, Iterable

import yaml
from pydantic import ValidationError

from cocomix_core.plumbing.errors import CocomixError
from settings.schema import ExperimentSettings

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "cpu"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow accepts in one param value
# Sections that say where results go, not what is computed: left out of the digest.
DIGEST_EXCLUDES = {"tracking", "preset"}


class SettingsError(CocomixError, ValueError):
    """A settings problem, worded for the user: names the field path and the bad value."""


def preset_names() -> list[str]:
    """Names of the presets shipped in settings/presets."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error names the unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line} (first given on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:  # a named stream: YAML errors show the file and line
            data = yaml.load(handle, Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise SettingsError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve_source(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise SettingsError(f"settings file {candidate} does not exist")
        return candidate
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise SettingsError(f"unknown preset {name_or_path!r}; known presets: {', '.join(preset_names())} (or give a .yaml path)")
    return preset


def _load_tree(name_or_path: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset or file, following `extends:` (a preset name or a path relative to the file)."""
    path = _resolve_source(name_or_path).resolve()
    if path in seen:
        raise SettingsError(f"{path}: `extends` forms a cycle through {[str(p) for p in seen]}")
    tree = _read_yaml(path)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    parent_ref = str(path.parent / parent) if str(parent).endswith((".yaml", ".yml")) else str(parent)
    return _deep_merge(_load_tree(parent_ref, seen + (path,)), tree)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `tree` with each dotted override set; unknown keys are caught by validation."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(
                    f"override {text!r}: {'.'.join(path[: depth + 1])} is a value ({child!r}), not a section"
                )
            node = child
        node[path[-1]] = value
    return tree


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling)"
        shown = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {where}: {message}{shown}")
    return "invalid settings:\n" + "\n".join(lines)


def validate_settings(tree: dict[str, Any]) -> ExperimentSettings:
    """Validate a raw settings tree, raising SettingsError that names each bad field."""
    try:
        return ExperimentSettings.model_validate(tree)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def load_settings(name_or_path: str = DEFAULT_PRESET, overrides: Iterable[str] = ()) -> ExperimentSettings:
    """Load a preset name or YAML file, apply dotted overrides and validate."""
    tree = _load_tree(name_or_path)
    tree.setdefault("preset", Path(name_or_path).stem)
    return validate_settings(apply_overrides(tree, overrides))


def flat_params(settings: ExperimentSettings) -> dict[str, str]:
    """Dotted key -> string value for every leaf, each value within MLflow's length limit."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            flat[prefix] = text if len(text) <= MLFLOW_PARAM_LIMIT else text[: MLFLOW_PARAM_LIMIT - 3] + "..."

    walk("", settings.model_dump(mode="json"))
    return flat


def settings_digest(settings: ExperimentSettings) -> str:
    """Stable sha256 of the resolved settings that affect results (tracking and the preset name excluded)."""
    payload = settings.model_dump(mode="json", exclude=DIGEST_EXCLUDES)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dump_yaml(settings: ExperimentSettings) -> str:
    """The resolved settings as YAML, loadable again with load_settings."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
