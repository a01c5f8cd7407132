"""Process-group setup: single process without a launcher, the `deepspeed` launcher, hostfiles.

How a process joins its group (`rendezvous()` decides, from the environment alone):
* No launcher (no RANK): world size 1 over an in-memory HashStore, so no rendezvous port is opened;
  gloo (CPU) and NCCL (GPU) are pinned to the loopback interface (GLOO_SOCKET_IFNAME /
  NCCL_SOCKET_IFNAME, unless set), so their own pair/bootstrap sockets listen on 127.0.0.1 only.
* The deepspeed launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment): rank 0
  serves the TCPStore on MASTER_PORT bound to MASTER_ADDR's address only (127.0.0.1 for a one-machine
  launch), where torch's own env:// store listens on every interface. With a loopback MASTER_ADDR
  gloo/NCCL are pinned to loopback as above. Several machines: MASTER_ADDR must be an address of the
  first node that the others reach (the launcher's --master_addr; an IP by default).
* torchrun (TORCHELASTIC_RUN_ID): torch's env:// rendezvous, which reuses the elastic agent's store.
Then deepspeed.init_distributed(dist_backend="gloo" on CPU, "nccl" on GPU) adopts the group.

DeepSpeed's CPU communication op (shm_comm) is a C++ extension JIT-compiled on first use (~50 s on
2 cores), cached under TORCH_EXTENSIONS_DIR (default <repo>/.cache/torch_extensions). It only speeds
up intra-node collectives between several CPU ranks; with one rank it is useless, so by default
(shm_comm="auto") it is skipped when the world size is 1 (DeepSpeed's op-compatibility table is
told the op is unavailable; DeepSpeed then falls back to plain torch.distributed/gloo).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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


@dataclass(frozen=True)
class Rendezvous:
    """How this process joins its process group (see the module docstring)."""

    kind: str  # "local": HashStore, world 1 | "tcp": our TCPStore bound to host | "env": torch's env://
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str | None = None  # the address the store binds to (rank 0) / connects to (others)
    port: int | None = None

    @property
    def loopback(self) -> bool:
        """Whether every rank is on this machine's loopback (gloo/NCCL can be pinned to it)."""
        return self.kind == "local" or (self.host is not None and _is_loopback(self.host))


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(ai[4][0]).is_loopback
                   for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


def rendezvous(env: Mapping[str, str] | None = None) -> Rendezvous:
    env = os.environ if env is None else env
    if "RANK" not in env:
        return Rendezvous("local")
    rank, world = int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in env:
        return Rendezvous("env", rank, world, local_rank)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"RANK is set but {' and '.join(missing)} not: start several ranks with the deepspeed "
                           "launcher, or unset RANK for a single process")
    return Rendezvous("tcp", rank, world, local_rank, env["MASTER_ADDR"], int(env["MASTER_PORT"]))


def _listen(host: str, port: int) -> int:
    """A listening TCP socket bound to HOST's address (not every interface); returns its fd."""
    err: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        s = socket.socket(family, kind, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(socket.SOMAXCONN)
            return s.detach()  # the TCPStore owns the fd from here on
        except OSError as e:
            s.close()
            err = e
    raise RuntimeError(f"cannot serve the rendezvous store on MASTER_ADDR={host} MASTER_PORT={port}: {err} "
                       "(MASTER_ADDR must be an address of this machine, the first node)")


def make_store(rdv: Rendezvous):
    """The rendezvous store for RDV; None for torch's env:// (torchrun)."""
    from datetime import timedelta

    import torch.distributed as dist

    if rdv.kind == "local":
        return dist.HashStore()
    if rdv.kind == "env":
        return None
    timeout = timedelta(seconds=int(os.environ.get("HRM_RENDEZVOUS_TIMEOUT", "600")))
    if rdv.rank == 0:
        return dist.TCPStore(rdv.host, rdv.port, rdv.world_size, True, timeout=timeout,
                             master_listen_fd=_listen(rdv.host, rdv.port))
    return dist.TCPStore(rdv.host, rdv.port, rdv.world_size, False, timeout=timeout)


def _loopback_interface() -> str | None:
    names = [n for _, n in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


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
    """Set up torch.distributed (see the module docstring), then DeepSpeed's communication backend on
    it; returns (rank, world_size, local_rank)."""
    extensions_dir()
    backend = "nccl" if device == "cuda" else "gloo"
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():  # a second run in this process: the group stays
        deepspeed.init_distributed(dist_backend=backend)
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    rdv = rendezvous()
    if device == "cpu":
        _skip_or_announce_shm(rdv.world_size, shm_comm)
    if rdv.kind == "local":  # DeepSpeed reads these
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    lo = _loopback_interface() if rdv.loopback else None
    if lo:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    store = make_store(rdv)
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=rdv.rank, world_size=rdv.world_size)
    deepspeed.init_distributed(dist_backend=backend)  # adopts the initialised group
    return dist.get_rank(), dist.get_world_size(), rdv.local_rank
