"""`hrm train` (or `python -m training`, the form the deepspeed launcher runs): train or resume one run.

PATH is a run folder (runs/demo: its pack, train folder RUN/train), a pack folder, or a train folder
(resumes it on the pack it records). The explicit form --shards PACK --out DIR works too.
Single process (no launcher; world size 1, no rendezvous port):
    hrm train runs/demo --preset debug --steps 200 --warmup-steps 20
    hrm train --shards runs/demo/pack --out runs/demo/train --preset debug --steps 200
Several local ranks (hrm train starts DeepSpeed's launcher; the same command resumes after a crash):
    hrm train runs/demo --num-gpus 8 --preset XL --bf16 --zero-stage 2
    (= deepspeed --num_gpus 8 --master_addr 127.0.0.1 -m training ...; on CPU the ranks use gloo + shm_comm)
Several machines (a hostfile lists "hostname slots=N" per line; the same folders on every node):
    hrm train runs/demo --hostfile hostfile --master-addr 10.0.0.1 ...       # from the first node, pdsh/ssh
    hrm train runs/demo --hostfile hostfile --node-rank $NODE_RANK --master-addr 10.0.0.1 ...
                                              # no ssh: the same command on every node (Slurm, containers)
The global batch is micro-batch-size x grad-accum x ranks: keep it when the rank count changes.
Rerunning resumes from the last checkpoint, only on the same pack, tokenizer and settings (--steps may
change); anything else is refused, and --restart starts a fresh run in the next free <out>-N folder.
Resuming unpickles DeepSpeed's .pt files: resume only train folders you made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training.config import TrainConfig


def build_parser(prog: str = "hrm train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="run folder (runs/demo), pack folder, or train folder to resume")
    p.add_argument("--shards", help="pack folder (shard-*.arrow + manifest.json), or a run folder / its pack root")
    p.add_argument("--out", help="train folder (config, metrics, checkpoints, exports); default RUN/train")
    p.add_argument("--restart", action="store_true",
                   help="when the train folder holds an earlier run, start afresh in the next free <out>-N "
                        "(the old one is kept) instead of resuming")
    p.add_argument("--preset", default="debug")
    p.add_argument("--arch", choices=["hrm", "transformer"], default="hrm")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override, JSON value (e.g. mask=\"causal\", num_layers=8)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--optimizer", choices=["adam_atan2", "adamw"], default="adam_atan2")
    p.add_argument("--lr", type=float, default=2.2e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=2000,
                   help="linear LR warmup steps (default 2000; lower it for short runs)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU (bf16 keeps fp32 gradient accumulation/reduction)")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--deepspeed-config", help="your own DeepSpeed JSON (replaces the generated one)")
    p.add_argument("--shm-comm", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--checkpoint-url", metavar="URL",
                   help="also keep the checkpoints on object storage (s3://bucket/run/checkpoints, gs://...): each "
                        "tag is published (files, then its _files.json), then URL/latest; a train folder without "
                        "a checkpoint resumes from the tag URL/latest names, fetched and checked")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (H100 default 989e12)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_launch_args(p.add_argument_group("several ranks (hrm train starts DeepSpeed's launcher)"))
    return p


def add_launch_args(p) -> None:
    """The options that say where the ranks go (training.distributed.Launch); they never reach the ranks."""
    p.add_argument("--num-gpus", type=int, default=1,
                   help="ranks on this machine (GPUs; CPU ranks without one); > 1 starts the deepspeed launcher")
    p.add_argument("--hostfile", help="DeepSpeed hostfile ('hostname slots=N' per line) for several machines")
    p.add_argument("--master-addr", help="rendezvous address: 127.0.0.1 on one machine (default); with a "
                                         "hostfile an address of its first host that the others reach")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default 29500)")
    p.add_argument("--node-rank", type=int, help="with --hostfile: this host's index in it; starts this host's "
                                                 "ranks only, without ssh (run the same command on every host)")
    p.add_argument("--launcher", help="with --hostfile and no --node-rank: DeepSpeed's multi-node backend "
                                      "(pdsh by default; openmpi, mvapich, slurm, ...)")


def launch_from_args(a: argparse.Namespace):
    from training.distributed import Launch

    return Launch(num_gpus=a.num_gpus, hostfile=a.hostfile, master_addr=a.master_addr, master_port=a.master_port,
                  node_rank=a.node_rank, launcher=a.launcher)


def launch(launch, argv: list[str]) -> int:
    """Run `hrm train ARGV` (the launch options taken out) on every rank through DeepSpeed's launcher."""
    import subprocess

    lp = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_launch_args(lp)
    _, rest = lp.parse_known_args(argv)
    cmd = launch.command("training") + rest
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def _is_train_folder(p: Path) -> bool:
    from training.records import LEGACY_RECORD, TRAIN_RECORD

    if (p / TRAIN_RECORD).is_file():
        return True
    try:  # a train folder from before train.json: run.json holding a training record
        rec = json.loads((p / LEGACY_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and "model_config" in rec and "stages" not in rec


def resolve_paths(path: str | None, shards: str | None, out: str | None) -> tuple[str, str, str | None]:
    """(pack folder, train folder, run folder or None) from PATH / --shards / --out.

    --shards and PATH are found with pipeline.runs.resolve_stage (a pack folder, a run folder, or a
    run's pack root); a train folder PATH gives its recorded pack and is the train folder itself. The
    train folder defaults to RUN/train when the pack belongs to a run folder."""
    from pipeline.runs import RunError, find_run_dir, resolve_stage
    from training.records import TRAIN_RECORD

    train_dir = None
    if path is not None and _is_train_folder(Path(path)):
        train_dir = Path(path)
        if shards is None:
            p = train_dir / TRAIN_RECORD
            rec = json.loads(p.read_text()) if p.is_file() else {}
            shards = rec.get("data", {}).get("pack_dir")
            if not shards:
                raise RunError(f"{path} records no pack folder: pass --shards PACK")
    elif path is not None:
        if shards is not None:
            raise RunError(f"give the pack once: PATH ({path}) or --shards ({shards}), not both")
        shards = path
    if shards is None:
        raise RunError("say what to train on: hrm train RUN_DIR (or a pack folder), or --shards PACK --out DIR")
    pack = resolve_stage(shards, "pack")
    from pipeline.storage import is_remote

    if is_remote(shards):  # fetched and checked into the local cache; the train folder stays local
        if out is None:
            raise RunError(f"{shards} is on object storage: pass --out DIR for the (local) train folder, and "
                           "--checkpoint-url URL to keep its checkpoints on object storage")
        return str(pack), out, None
    run_dir = find_run_dir(train_dir.parent) if train_dir is not None else find_run_dir(shards)
    if out is None:
        if train_dir is not None:
            out = str(train_dir)
        elif run_dir is not None:
            out = str(run_dir / "train")
        else:
            raise RunError(f"{shards} is not in a run folder: pass --out DIR for the train folder")
    elif train_dir is not None and Path(out).resolve() != train_dir.resolve():
        raise RunError(f"PATH {path} is a train folder; --out {out} names another one: give one of them")
    return str(pack), out, str(run_dir) if run_dir is not None else None


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    shards, out, run_dir = resolve_paths(a.path, a.shards, a.out)
    over = {}
    for kv in a.model_set:
        if "=" not in kv:
            raise ValueError(f"--model-set needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return TrainConfig(
        shards=shards, out=out, run_dir=run_dir, restart=a.restart, preset=a.preset, arch=a.arch, model_overrides=over, vocab_size=a.vocab_size,
        steps=a.steps, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum, seed=a.seed,
        optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        lr_schedule=a.lr_schedule, ema_decay=a.ema_decay, grad_clip=a.grad_clip, engine=a.engine,
        zero_stage=a.zero_stage, precision="bf16" if a.bf16 else a.precision, device=a.device,
        deepspeed_json=a.deepspeed_config, shm_comm=a.shm_comm, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, peak_flops=a.peak_flops, progress=not a.no_progress,
        checkpoint_url=a.checkpoint_url,
    )


def next_command(summary: dict) -> str:
    """The command to type after training: evaluate the run folder (or the train folder outside one)."""
    target = summary.get("run_dir") or summary["out"]
    return f"hrm eval {target} --benchmarks BENCH_DIR --limit 20"


def main(argv: list[str] | None = None, prog: str = "hrm train") -> int:
    from pipeline.runs import RunError

    p = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    try:
        where = launch_from_args(a)
        if not where.single_process:
            if "RANK" in os.environ:
                raise ValueError("--num-gpus/--hostfile start DeepSpeed's launcher; this process already runs under "
                                 f"one (RANK={os.environ['RANK']}): drop them")
            where.check()
    except ValueError as e:
        p.error(str(e))
    if not where.single_process:
        try:
            config_from_args(a)  # path errors now, not once per rank
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (ValueError, TypeError) as e:
            p.error(str(e))
        return launch(where, argv)
    try:
        cfg = config_from_args(a)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        p.error(str(e))
    if cfg.warmup_steps >= cfg.steps:
        print(f"warning: --warmup-steps {cfg.warmup_steps} >= --steps {cfg.steps}: the learning rate never reaches "
              f"{cfg.lr:g} (it ends at {cfg.lr * cfg.steps / max(cfg.warmup_steps, 1):.3g}); pass a smaller "
              "--warmup-steps for a short run", file=sys.stderr)
    from training.data import ShardChecksumError
    from training.records import ResumeRefused
    from training.train import TrainingDiverged, train

    try:
        summary = train(cfg)
    except (TrainingDiverged, ShardChecksumError, ResumeRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if os.environ.get("RANK", "0") == "0":
        print(f"next: {next_command(summary)}", file=sys.stderr)
    return 0
