"""A complete params.yaml for a test: the code's defaults (ubo_core.config.default_document)
with the test's sections merged in. params.yaml must give every key of its sections, so a
test states only what it is about and this fills in the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ubo_core.config import default_document


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, mappings key by key (the sections' keys), `catalog`
    replaced whole (a test's catalog is the data sets it builds)."""
    out = dict(base)
    for key, value in extra.items():
        if key != "catalog" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def dump(document: dict[str, Any]) -> str:
    """YAML with `datasets:` (the tuned block flows.tune rewrites) last, as in params.yaml."""
    ordered = {k: v for k, v in document.items() if k != "datasets"}
    if document.get("datasets"):  # an empty one is no block at all
        ordered["datasets"] = document["datasets"]
    return yaml.safe_dump(ordered, sort_keys=False)


def complete(text: str) -> str:
    """The YAML `text` (some sections of params.yaml) completed with the code's defaults."""
    return dump(merged(default_document(), yaml.safe_load(text) or {}))


def write_params(path: Path, text: str) -> Path:
    path.write_text(complete(text))
    return path


def add_sections(path: Path, text: str) -> Path:
    """Merge the YAML `text` into the params file at `path` (a test's later settings)."""
    path.write_text(dump(merged(yaml.safe_load(path.read_text()), yaml.safe_load(text))))
    return path
