"""Loading `data_specs/*.yaml` into a typed `RunSpec`, failing before any work starts.

Errors name the file, the field (as a path like `sources[2].kind`) and what was expected.
"""

from __future__ import annotations

import copy
import os
import re
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


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\d+")


def parse_overrides(pairs: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["dedup.threshold=0.7", "mix.epochs=2"]` -> {"dedup.threshold": 0.7, "mix.epochs": 2} (values are
    YAML: numbers, booleans, lists and quoted strings as in a spec file). A dict is returned as is."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return dict(pairs)
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise SpecError(f"--set expects KEY=VALUE (e.g. dedup.threshold=0.7), got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {k.strip()}: value {v!r} is not valid YAML ({e})") from None
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the spec mapping with each dotted key set (`dedup.threshold`, `sources[0].path`,
    `contamination.benchmarks_dir`; missing sections are created). Validation happens afterwards, on
    the whole spec, so a bad key or value gets the same error as in the file."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = _KEY.findall(key)
        if not parts or "".join(p if p.startswith("[") else "." + p for p in parts).lstrip(".") != key.strip():
            raise SpecError(f"--set {key}: not a setting path (expected e.g. dedup.threshold or sources[0].path)")
        cur: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            idx = int(part.strip("[]")) if part.strip("[]").isdigit() else None
            if idx is not None:
                if not isinstance(cur, list) or idx >= len(cur):
                    raise SpecError(f"--set {key}: {'.'.join(parts[:i]) or 'spec'} has no item {idx}")
                if last:
                    cur[idx] = value
                else:
                    cur = cur[idx]
                continue
            if not isinstance(cur, dict):
                raise SpecError(f"--set {key}: {part!r} is inside a value that is not a section")
            if last:
                cur[part] = value
            else:
                if cur.get(part) is None:
                    cur[part] = {}
                cur = cur[part]
    return data


def load_spec(path_or_name: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None) -> RunSpec:
    """Load and validate a spec; OVERRIDES (`--set` pairs) are applied before validation, and errors
    name them as `(with --set ...)`."""
    p = resolve_spec_path(path_or_name)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    ov = parse_overrides(overrides)
    if ov:
        if not isinstance(data, dict):
            raise SpecError(f"{p}: a spec must be a YAML mapping at the top level")
        data = apply_overrides(data, ov)
        origin = f"{p} (with --set {', '.join(f'{k}={v!r}' for k, v in ov.items())})"
        return parse_spec(data, origin)
    return parse_spec(data, str(p))
