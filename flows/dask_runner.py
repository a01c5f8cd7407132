"""The data stages' parts on a Dask cluster, through Prefect's Dask task runner (`prefect-dask`).

`hrm run --runner dask [--address tcp://host:8786] [--workers N]` (or `resources.runner: dask` in the
spec): the data flow opens a `DaskTaskRunner`, connected to the scheduler at `address`, or starting a
`LocalCluster` of N worker processes on 127.0.0.1, and hands the stages' independent parts to it, each
part a Prefect task run on a Dask worker: one per source for ingest and normalize, one per MinHash
signature part for dedup, one per row range of the training scan for contamination (4 batches of
`contamination.batch_rows`), one per shard for pack (the packing plan stays in the stage's task). The
stage merges the parts in a fixed order (the spec's source order, the part number, the row range, the
shard number), so its outputs are byte-identical to the single-process run (`--runner local`, the
default). The workers read and write the run folder, so on a real cluster it must be on a filesystem
every worker sees. Stratify, tokenizer, mix and lineage run in the stage's task (one process).

Why Dask: `LocalCluster` runs in-process on this machine (the tests need nothing else), parts are the
same Python objects (cloudpickle), and `prefect-dask` is Prefect's maintained integration; Ray brings a
larger runtime (its own object store and raylet processes) that these file-to-file parts do not use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

RUNNERS = ("local", "dask")

_current: "DaskParts | None" = None  # the parts mapper of the data flow running in this process


@task(name="part", cache_policy=NO_CACHE, persist_result=False)
def part_task(fn: Callable[..., Any], args: tuple) -> Any:
    """One part of a stage (a `pipeline.parts` call), run on a Dask worker."""
    return fn(*args)


class DaskParts:
    """`pipeline.parts.MapParts` through a started DaskTaskRunner: each part a Prefect task run
    (named after the part function and its number); results in the order of the arguments."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, fn: Callable[..., Any], args: Sequence[tuple]) -> list:
        futures = [self.runner.submit(part_task.with_options(task_run_name=f"{fn.__name__}-{i}"),
                                      {"fn": fn, "args": tuple(a)}) for i, a in enumerate(args)]
        return [f.result() for f in futures]


def make_runner(address: str | None = None, workers: int = 2):
    """A DaskTaskRunner on the scheduler at `address`, else on a LocalCluster of `workers` processes
    (one thread each) bound to 127.0.0.1."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})


@contextlib.contextmanager
def parts_runner(runner: str = "local", address: str | None = None, workers: int = 2) -> Iterator[None]:
    """While open, the data stages of this process hand their parts to `runner` (see `map_parts`)."""
    global _current
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "local":
        if address:
            raise ValueError("--address is for --runner dask")
        yield
        return
    with make_runner(address, workers) as tr:
        prev, _current = _current, DaskParts(tr)
        try:
            yield
        finally:
            _current = prev


def map_parts() -> DaskParts | None:
    """The parts mapper the stage tasks pass to `pipeline` (None: the stage's own single-process path)."""
    return _current
