"""Process-group setup: single process without a launcher, the `deepspeed` launcher, hostfiles.

Single process: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are set (world size 1,
127.0.0.1, a free port) when no launcher set them; then deepspeed.init_distributed(dist_backend=
"gloo" on CPU, "nccl" on GPU).

DeepSpeed's CPU communication op (shm_comm) is a C++ extension JIT-compiled on first use (~50 s on
2 cores), cached under TORCH_EXTENSIONS_DIR (default <repo>/.cache/torch_extensions). It only speeds
up intra-node collectives between several CPU ranks; with one rank it is useless, so by default
(shm_comm="auto") it is skipped when the world size is 1 (DeepSpeed's op-compatibility table is
told the op is unavailable; DeepSpeed then falls back to plain torch.distributed/gloo).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def extensions_dir() -> Path:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    return device


def _skip_or_announce_shm(world_size: int, mode: str) -> None:
    """Decide about DeepSpeed's shm_comm op on CPU before the backend is created."""
    import deepspeed.ops

    ext = extensions_dir()
    use = mode == "on" or (mode == "auto" and world_size > 1)
    if not use:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read by comm.torch.build_shm_op
        return
    if not list(ext.glob("deepspeed_shm_comm/*.so")):
        print(f"compiling DeepSpeed CPU communication op once, cached in {ext} (about a minute) ...",
              file=sys.stderr, flush=True)


def init_distributed(device: str, shm_comm: str = "auto") -> tuple[int, int, int]:
    """Set up torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    extensions_dir()
    if "RANK" not in os.environ:  # no launcher: a single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    import deepspeed
    import torch.distributed as dist

    if device == "cpu":
        _skip_or_announce_shm(world, shm_comm)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")  # idempotent
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
