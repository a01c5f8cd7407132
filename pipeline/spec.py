"""Loading `data_specs/*.yaml` into a typed `RunSpec`, failing before any work starts.

Errors name the file, the field (as a path like `sources[2].kind`) and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import RunSpec

import data_specs

SPEC_DIR = Path(data_specs.__file__).resolve().parent


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and every bad field."""


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict, data: Any) -> str:
    loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-")))
    where = _loc(loc, data)
    typ = err.get("type", "")
    msg = err.get("msg", "")
    if typ == "extra_forbidden":
        return f"{where}: unknown field (not part of the spec; check the spelling)"
    if typ == "missing":
        return f"{where}: required field is missing"
    got = err.get("input")
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if typ in ("value_error", "assertion_error"):
        return f"{where}: {msg.removeprefix('Value error, ')}"
    return f"{where}: {msg} (got {shown})"


def parse_spec(data: Any, origin: str = "<spec>") -> RunSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a spec must be a YAML mapping at the top level, got {type(data).__name__}")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, data) for err in e.errors(include_url=False)]
        raise SpecError(f"{origin}: invalid spec:\n  - " + "\n  - ".join(lines)) from None


def resolve_spec_path(path_or_name: str | os.PathLike) -> Path:
    """A path to a YAML file, or the name of a bundled spec ('demo' -> data_specs/demo.yaml)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    bundled = SPEC_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if bundled.exists():
        return bundled
    known = sorted(x.stem for x in SPEC_DIR.glob("*.yaml"))
    raise SpecError(f"{path_or_name}: no such spec file (bundled specs: {known})")


def load_spec(path_or_name: str | os.PathLike) -> RunSpec:
    p = resolve_spec_path(path_or_name)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    return parse_spec(data, str(p))
