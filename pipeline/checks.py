"""Checks of a loaded spec against what it names, before any work starts (no network, no data read).

`RunSpec` validation checks the spec's own shape; these check what it points at: every local source's
path matches at least one supported file, and every generator source names a built-in generator with
parameters it accepts. `hrm validate` prints every problem; a flow calls `require_ok` before its
first task.
"""

from __future__ import annotations

from pathlib import Path

from . import generators
from .config import RunSpec
from .spec import SpecError
from .stages.ingest import find_local_files, no_files_message


def check_spec(spec: RunSpec) -> list[str]:
    """Every problem found, one message each naming the source (empty: the spec can run)."""
    problems: list[str] = []
    for i, src in enumerate(spec.sources):
        where = f"sources[{i}]"
        if src.kind == "local":
            if not find_local_files(src.path):
                rel = "" if Path(src.path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
                problems.append(f"{where}: {no_files_message(src.path, src.name)}{rel}")
        elif src.kind == "generator":
            bad = generators.check_params(src.generator, src.params)
            problems += [f"{where}: source '{src.name}': {p}" for p in bad]
    return problems


def require_ok(spec: RunSpec, origin: str = "<spec>") -> None:
    """Raise SpecError listing every problem `check_spec` finds, one per line."""
    problems = check_spec(spec)
    if problems:
        raise SpecError(f"{origin}: spec {spec.name!r} has {len(problems)} problem(s):\n  - "
                        + "\n  - ".join(problems))
