"""A Prefect cache policy keyed on content, not on paths or run ids.

Prefect's default policy includes the flow-run id, so every new run recomputes everything. The stages
pass folder paths between them, and a path says nothing about what is in it, so `StageCache` hashes:
- the content of every path argument (a stage folder by its manifest's output records, a file by its
  XXH3-128 hash: `pipeline.io.content_hash`),
- every other argument (configs by their JSON dump),
- the source code of the task function and of the pipeline modules that do the work (with every
  pipeline module they use: `pipeline.io.code_modules`).
An unchanged rerun hits the cache for every task; a changed dedup threshold changes the dedup task's
key, its output manifest changes, and so does the key of every task downstream of it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

from pipeline.io import code_hash, code_modules, content_hash, sha256_json


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, Path):
        return str(v)
    return v


def _content(path: str | Path) -> str:
    p = Path(path)
    return content_hash(p) if p.exists() else f"missing:{p}"


@dataclass
class StageCache(CachePolicy):
    path_params: tuple[str, ...] = ()  # arguments that are input paths: hashed by content
    modules: tuple[str, ...] = ()  # modules whose source is part of the key
    ignore: tuple[str, ...] = field(default=("progress", "force", "memory_gb"))  # memory_gb: never the outputs

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        key: dict[str, Any] = {}
        for name, val in sorted((inputs or {}).items()):
            if name in self.ignore:
                continue
            if name in self.path_params and isinstance(val, (str, Path)):
                key[name] = _content(val)
            elif name in self.path_params and isinstance(val, dict):
                key[name] = {str(k): _content(v) for k, v in sorted(val.items())}
            else:
                key[name] = _plain(val)
        fn = task_ctx.task.fn
        key["__task__"] = code_hash(fn)
        # each module with the pipeline modules it uses (io.code_modules): the shared reader and writers too
        key["__modules__"] = {m.__name__: code_hash(m) for m in
                              code_modules(*(importlib.import_module(x) for x in self.modules))}
        return sha256_json(key)
