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


# --- starting several ranks: the deepspeed launcher -------------------------------------------------

LOOPBACK = "127.0.0.1"


def read_hostfile(path: str | Path) -> dict[str, int]:
    """HOSTFILE's hosts and their slots ("hostname slots=N" per line, # comments), in order; errors name
    the line. The same format DeepSpeed's launcher reads."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"hostfile {path} does not exist")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise ValueError(f"{path}:{n}: expected 'HOSTNAME slots=N' (N >= 1), got {raw.strip()!r}")
        if parts[0] in hosts:
            raise ValueError(f"{path}:{n}: host {parts[0]} is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ValueError(f"hostfile {path} lists no host")
    return hosts


@dataclass(frozen=True)
class Launch:
    """Where the ranks of one training run go (`hrm train --num-gpus/--hostfile/...`, the pipeline's
    train step). The default, one process, needs no launcher.

    * num_gpus > 1, no hostfile: DeepSpeed's launcher starts num_gpus local ranks (CPU ranks when there
      is no GPU), rendezvous on master_addr (127.0.0.1 by default: nothing listens beyond loopback).
    * hostfile: the ranks of every host it lists ("hostname slots=N"). master_addr must then be an
      address of the first host that the others reach; None lets DeepSpeed find it (`ssh FIRST
      hostname -I`). The launcher reaches the other hosts with pdsh over passwordless ssh (`launcher`:
      pdsh, openmpi, mvapich, slurm, ... as DeepSpeed names them).
    * hostfile + node_rank: no ssh: the same command is started on each host (by Slurm, a container
      scheduler or by hand) with that host's node rank; master_addr is required.
    """

    num_gpus: int = 1
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int = 29500
    node_rank: int | None = None
    launcher: str | None = None

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.node_rank is not None and not self.hostfile:
            raise ValueError("node_rank needs a hostfile (the hosts whose ranks node_rank counts)")
        if self.launcher is not None and not self.hostfile:
            raise ValueError("launcher (pdsh, openmpi, slurm, ...) needs a hostfile")
        if self.hostfile and self.num_gpus > 1:
            raise ValueError("give num_gpus or a hostfile, not both: a hostfile's slots say how many ranks each host runs")

    @property
    def single_process(self) -> bool:
        return self.num_gpus == 1 and not self.hostfile

    def check(self) -> dict[str, int] | None:
        """Validate the hostfile against the other settings (errors name what is wrong); its hosts."""
        if not self.hostfile:
            return None
        hosts = read_hostfile(self.hostfile)
        if self.node_rank is not None:
            if not 0 <= self.node_rank < len(hosts):
                raise ValueError(f"node_rank {self.node_rank} is not a host of {self.hostfile} "
                                 f"(it lists {len(hosts)}: 0..{len(hosts) - 1})")
            if self.master_addr is None:
                raise ValueError("node_rank (a launch without ssh) needs master_addr: an address of the first "
                                 f"host of {self.hostfile} ({next(iter(hosts))}) that every host reaches")
        if len(hosts) > 1 and self.master_addr is not None and _is_loopback(self.master_addr):
            # one machine playing several nodes (tests) is fine without ssh; with ssh the other hosts
            # would each connect to their own loopback
            if self.node_rank is None:
                raise ValueError(f"master_addr {self.master_addr} is a loopback address but {self.hostfile} lists "
                                 f"{len(hosts)} hosts: give an address of {next(iter(hosts))} that the others reach "
                                 "(or none: DeepSpeed asks the first host)")
        return hosts

    @property
    def world_size(self) -> int:
        hosts = self.check()
        return self.num_gpus if hosts is None else sum(hosts.values())

    def command(self, module: str = "training", python: str | None = None) -> list[str]:
        """The command prefix that runs `python -m MODULE` on every rank (its own arguments follow)."""
        python = python or sys.executable
        if self.single_process:
            return [python, "-m", module]
        self.check()
        cmd = [python, "-m", "deepspeed.launcher.runner", "--master_port", str(self.master_port)]
        if self.hostfile:
            cmd += ["--hostfile", str(self.hostfile)]
            if self.master_addr is not None:
                cmd += ["--master_addr", self.master_addr]
            if self.node_rank is not None:
                cmd += ["--no_ssh", "--node_rank", str(self.node_rank)]
            if self.launcher:
                cmd += ["--launcher", self.launcher]
        else:
            import torch

            cmd += ["--master_addr", self.master_addr or LOOPBACK]
            cmd += ["--num_gpus" if torch.cuda.is_available() else "--num_accelerators", str(self.num_gpus)]
        return cmd + ["--module", module]
