"""Part-level work: how a stage hands out its independent parts (one source of ingest or normalize, one
MinHash signature part of dedup, one row range of contamination's training scan, one pack shard).

A stage's `run(..., map_parts=None)` builds the list of parts, each a picklable call `fn(*args)` that
writes its own file(s) and returns a small picklable record, and hands them to `map_parts(fn, args)`,
which returns the records in the order of `args`. The stage then merges the parts in that order, so
the outputs never depend on who computed the parts or in which order they finished. `serial` (the
default) computes them one after the other in this process; `flows.dask_runner` submits each as a
Prefect task to a Dask cluster (the workers must see the run folder). No Prefect here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MapParts = Callable[[Callable[..., Any], Sequence[tuple]], list]


def serial(fn: Callable[..., Any], args: Sequence[tuple]) -> list:
    """Each part in turn, in this process."""
    return [fn(*a) for a in args]
