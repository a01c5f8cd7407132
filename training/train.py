"""The training loop: `train(cfg) -> summary dict`.

Train folder layout (cfg.out):
  train.json           exact config, DeepSpeed config, model config, git sha, and the record of what the
                       run is made from (training.records: pack and tokenizer hashes, config_sha256)
  tokenizer/           tokenizer.json + tokenizer_meta.json of the pack, copied at the start
  metrics.jsonl        one line per step (loss, answer-token loss, answer tokens, grad norm, lr, bp, tokens/s, MFU;
                       with the full LM loss (model loss="full") `loss` covers every next token and
                       `answer_loss` the response tokens only)
  tensorboard/         the same scalars (when the tensorboard package is installed)
  checkpoints/         DeepSpeed checkpoints (tags step-00000010, ...; `latest`), each with the
                       EMA weights, loader position, RNG states and recent losses as client state, and
                       train_record.json (the same record as train.json, plain JSON)
  export/step-N/{raw,ema}/   consolidated safetensors (model.save_checkpoint) written with each checkpoint,
                       with the tokenizer files and config.json["data"] (tokenizer and pack hashes, folders)
  final/{raw,ema}/     the same for the last step
When the pack belongs to a run folder (cfg.run_dir), its run manifest's `train` entry names this folder.

Resume: rerunning the same command finds checkpoints/latest and continues from it; the data stream,
LR, bp schedule, EMA and RNG continue exactly, so the final weights equal an uninterrupted run's.
Only a run made from the same pack, tokenizer and config is resumed (training.records.check_resume);
cfg.restart starts afresh in the next free `<out>-N` instead. Resuming unpickles DeepSpeed's .pt files:
resume only your own train folders.

Loss normalisation: each micro batch's summed loss is divided by the answer tokens of the whole
optimizer step (all ranks, all micro batches; computed from the data, no collective), times
world * grad_accum to undo DeepSpeed's own averaging: the gradient is d(sum loss) / (answer tokens).

Safety: a non-finite loss or grad norm, or a loss above spike_factor x the recent median, stops the
run with TrainingDiverged naming the step and the batch's sample ids; a checkpoint is written only
after checking the weights are finite.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import bp_schedule, build_labels, build_model, count_flops, lm_loss, save_checkpoint
from training import records
from training.config import TrainConfig
from training.data import Batch, Loader, PackedShards
from training.distributed import REPO, init_distributed, resolve_device
from training.optim import EMA, build_optimizer, lr_lambda

H100_PEAK_BF16 = 989e12


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# run records
# ----------------------------------------------------------------------------------------------
def git_version() -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return {"git_sha": sha.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "dirty": None}


def tokenizer_vocab(tokenizer_dir: str | Path | None) -> int | None:
    """The vocabulary size in the tokenizer folder's tokenizer_meta.json (None without one)."""
    meta = Path(tokenizer_dir) / "tokenizer_meta.json" if tokenizer_dir else None
    if meta and meta.exists():
        return int(json.loads(meta.read_text())["vocab_size"])
    return None


def default_peak_flops(device: str) -> float | None:
    if device == "cuda" and "H100" in torch.cuda.get_device_name():
        return H100_PEAK_BF16
    return None


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------
# engines: DeepSpeed and the plain PyTorch reference share one interface
# ----------------------------------------------------------------------------------------------
class TorchEngine:
    """The plain PyTorch loop (reference for tests and benchmarks; no checkpoint resume)."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float) -> None:
        self.module, self.optimizer, self.scheduler, self.grad_clip = model, optimizer, scheduler, grad_clip
        self._norm: float | None = None

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss) -> None:
        loss.backward()

    def micro_step(self) -> None:
        pass  # gradients accumulate in .grad until finish_step

    def finish_step(self) -> None:
        # A parameter without a gradient this step (the embedding at bp=2) keeps grad None and the
        # optimizer skips it, as the reference does: no weight decay, no moment update.
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            self._norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            self._norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        return self._norm


class DeepSpeedEngine:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.module = engine.module
        self.optimizer = engine.optimizer

    def __call__(self, **kw):
        return self.engine(**kw)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def micro_step(self) -> None:
        self.engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary

    def finish_step(self) -> None:
        self._norm = None
        if self.engine.zero_optimization_stage() == 0 and self.engine.gradient_clipping() <= 0:
            # DeepSpeed computes no norm without ZeRO or clipping: take it from the .grad tensors
            grads = [p.grad.float().norm() for p in self.module.parameters() if p.grad is not None]
            if grads:
                self._norm = float(torch.linalg.vector_norm(torch.stack(grads)))
        self.engine.step()

    def grad_norm(self) -> float | None:
        n = self.engine.get_global_grad_norm()
        return self._norm if n is None else float(n)


def _build_deepspeed(cfg: TrainConfig, model, world: int, device: str):
    import deepspeed

    # ZeRO's flat fp32 partitions get a zero gradient (never None) where no gradient reached:
    # skip_zero_grad skips them (the embedding has its own group, see training.optim.param_groups)
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.weight_decay, skip_zero_grad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule, cfg.min_lr_ratio))
    ds_cfg = cfg.deepspeed_config(world, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    return DeepSpeedEngine(engine), ds_cfg


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run described by cfg; returns a summary (final loss, steps, paths)."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if cfg.engine == "deepspeed":
        rank, world, local_rank = init_distributed(device, cfg.shm_comm)
    else:
        rank, world, local_rank = 0, 1, 0
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    is_main = rank == 0

    shards = PackedShards(cfg.shards)
    data = records.data_record(cfg.shards)
    if is_main and data["tokenizer_sha256"] is None:
        print(f"warning: the pack manifest names no tokenizer folder with a tokenizer.json "
              f"({data['tokenizer_dir']}): the vocabulary comes from --vocab-size or the preset, and the "
              "exports carry no tokenizer", file=sys.stderr)
    mcfg = cfg.model_config(cfg.vocab_size or tokenizer_vocab(data["tokenizer_dir"]))
    if shards.seq_len > mcfg.max_seq_len:
        mcfg = mcfg.replace(max_seq_len=shards.seq_len)
    shards.loss = mcfg.loss  # the labels follow the model's objective (answer-only or full LM loss)
    given = records.record(data, records.run_identity(cfg, mcfg.to_dict(), world, device))
    if cfg.checkpoint_url and not cfg.restart:
        _fetch_remote_checkpoint(cfg.checkpoint_url, out / "checkpoints", rank, world)
    out = _claim_out(out, cfg, given, rank, world)
    tok_dir = out / "tokenizer"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if data["tokenizer_sha256"] is not None:  # pinned for the exports, whatever happens to the source
            records.copy_tokenizer(data["tokenizer_dir"], tok_dir)
    tok_files = [tok_dir / n for n in records.TOKENIZER_FILES] if data["tokenizer_sha256"] is not None else []
    export = {"data": records.export_data_record(data), "files": tok_files}
    loader = Loader(shards, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, rank=rank,
                    world_size=world, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    if cfg.resolved_precision(device) == "bf16" and cfg.engine == "torch":
        model = model.to(torch.bfloat16)
    model = model.to(dev)
    ds_cfg = None
    if cfg.engine == "deepspeed":
        engine, ds_cfg = _build_deepspeed(cfg, model, world, device)
        model = engine.module
    else:
        opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.betas, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule, cfg.min_lr_ratio))
        engine = TorchEngine(model, opt, sched, cfg.grad_clip)
    ema = EMA(model, cfg.ema_decay)

    ckdir = out / "checkpoints"
    start_step, recent = 0, []
    resumed_from = None
    if cfg.engine == "deepspeed" and (ckdir / "latest").exists():
        path, client = engine.engine.load_checkpoint(str(ckdir))
        if path is None:
            raise RuntimeError(f"could not load the checkpoint named by {ckdir / 'latest'}")
        start_step = int(client["step"])
        loader.load_state_dict(client["loader"])
        ema.load_state_dict(client["ema"])
        _set_rng_state(client["rng"][rank] if isinstance(client["rng"], list) else client["rng"])
        recent = list(client.get("recent_losses", []))
        resumed_from = path
        if is_main:
            print(f"resuming from {path} at step {start_step} (same pack {data['pack_version']}, tokenizer "
                  f"{str(data['tokenizer_sha256'])[:16]} and config {given['config_sha256'][:16]} as recorded)",
                  file=sys.stderr, flush=True)

    if is_main:
        _keep_metrics_until(out / "metrics.jsonl", start_step)
        record = {
            **given, "config": cfg.to_dict(), "deepspeed_config": ds_cfg, "model_config": mcfg.to_dict(),
            "code": git_version(), "sequences": len(shards), "seq_len": shards.seq_len,
            "world_size": world, "device": device, "resumed_from": resumed_from, "start_step": start_step,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
        if cfg.engine == "deepspeed":
            import deepspeed

            record["versions"]["deepspeed"] = deepspeed.__version__
        _write_json(out / records.TRAIN_RECORD, record)
        _record_in_run(cfg, out, data, given, status="training", step=start_step)

    peak = cfg.peak_flops or default_peak_flops(device)
    writer = _tensorboard(out / "tensorboard") if (is_main and cfg.tensorboard) else None
    log = open(out / "metrics.jsonl", "a") if is_main else None
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    last_loss = float("nan")
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            bp = bp_schedule(step, cfg.steps, cfg.bp_start, cfg.bp_end, cfg.bp_warmup_frac) if mcfg.arch == "hrm" else None
            lr = engine.optimizer.param_groups[0]["lr"]
            micro, n_global = loader.next_step()
            scale = world * cfg.grad_accum / max(n_global, 1) if cfg.engine == "deepspeed" else 1.0 / max(n_global, 1)
            loss_sum = torch.zeros((), dtype=torch.float64)
            ans_sum, ans_n = torch.zeros((), dtype=torch.float64), 0  # answer-token loss (full LM loss only)
            flops = 0.0
            for j, mb in enumerate(micro):
                b = mb.packed.to(dev)
                o = engine(**b.as_kwargs(), bp=bp)
                if mcfg.loss == "full":
                    with torch.no_grad():
                        al = build_labels(b.input_ids, b.segment_ids, b.is_prompt, "answer")
                        ans_sum += lm_loss(o.logits.detach(), al)[1].double().cpu()
                        ans_n += int((al != -100).sum())
                if cfg.fail_at_step is not None and step == cfg.fail_at_step:  # testing hook
                    o.loss_sum = o.loss_sum * float("nan")
                loss = o.loss_sum * scale
                engine.backward(loss)
                loss_sum += o.loss_sum.detach().double().cpu()
                flops += count_flops(mcfg, segment_ids=mb.packed.segment_ids, is_prompt=mb.packed.is_prompt, bp=bp).total
                if j < len(micro) - 1:
                    engine.micro_step()
            if world > 1:
                import torch.distributed as dist

                t = torch.tensor([loss_sum.item(), flops, ans_sum.item(), ans_n], dtype=torch.float64, device=dev)
                dist.all_reduce(t)
                loss_sum, flops, ans_sum, ans_n = t[0].cpu(), float(t[1]), t[2].cpu(), int(t[3])
            step_loss = float(loss_sum) / max(n_global, 1)
            answer_loss = float(ans_sum) / max(ans_n, 1) if mcfg.loss == "full" else step_loss
            _check(step, step_loss, recent, cfg, micro, "loss")
            engine.finish_step()
            gn = engine.grad_norm()
            if gn is not None and not math.isfinite(gn):
                _check(step, float("nan"), recent, cfg, micro, "grad norm")
            ema.update(model)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens = cfg.global_batch(world) * shards.seq_len
            rec = {"step": step + 1, "loss": step_loss, "answer_loss": answer_loss,
                   "loss_tokens": n_global if mcfg.loss == "full" else None,
                   "answer_tokens": ans_n if mcfg.loss == "full" else n_global, "grad_norm": gn, "lr": lr,
                   "bp": bp, "tokens_per_s": tokens / dt, "step_s": dt, "flops": flops,
                   "mfu": (flops / dt / (peak * world)) if peak else None}
            recent = (recent + [step_loss])[-cfg.spike_window:]
            last_loss = step_loss
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if writer is not None:
                for k in ("loss", "answer_tokens", "grad_norm", "lr", "bp", "tokens_per_s", "mfu"):
                    if rec[k] is not None:
                        writer.add_scalar(f"train/{k}", rec[k], step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", bp=bp, tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            done = step + 1
            if cfg.engine == "deepspeed" and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
                _save(engine, ema, loader, mcfg, ckdir, out, done, recent, cfg, world, rank, given, export)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()

    final = out / "final"
    if is_main:
        _export(model, ema, mcfg, final, export)
        _record_in_run(cfg, out, data, given, status="done", step=cfg.steps, final=final)
    return {"final_loss": last_loss, "steps": cfg.steps, "start_step": start_step, "out": str(out),
            "final_raw": str(final / "raw"), "final_ema": str(final / "ema"), "metrics": str(out / "metrics.jsonl"),
            "checkpoints": str(ckdir) if cfg.engine == "deepspeed" else None, "checkpoint_url": cfg.checkpoint_url,
            "world_size": world,
            "run_dir": cfg.run_dir, "data": data, "config_sha256": given["config_sha256"]}


def _claim_out(out: Path, cfg: TrainConfig, given: dict, rank: int, world: int) -> Path:
    """The train folder this run writes: OUT when it is new or holds the same run (resume); with
    cfg.restart and an earlier run in OUT, the next free OUT-N (chosen by rank 0, told to the others);
    otherwise ResumeRefused when OUT's record differs from GIVEN."""
    if cfg.restart:
        choice = None
        if rank == 0:
            choice = str(records.next_free(out)) if records.has_run(out) else str(out)
            if choice != str(out):
                print(f"--restart: {out} holds an earlier run (kept); this run writes {choice}",
                      file=sys.stderr, flush=True)
        if world > 1:
            import torch.distributed as dist

            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        return Path(choice)
    rec = records.recorded(out)
    if rec is not None:
        records.check_resume(out, rec, given)
        steps = rec.get("config", {}).get("steps")
        if rank == 0 and steps is not None and steps != cfg.steps:
            print(f"note: {out} was started with --steps {steps}; this run goes to --steps {cfg.steps}",
                  file=sys.stderr)
    return out


def _fetch_remote_checkpoint(url: str, ckdir: Path, rank: int, world: int) -> None:
    """A train folder with no checkpoint of its own resumes from the copy on object storage: rank 0 fetches
    the tag URL/latest names (every file checked) into CKDIR (shared by the ranks, as the checkpoints are)."""
    if rank == 0 and not (ckdir / "latest").exists():
        from pipeline.storage import fetch_checkpoint

        ckdir.mkdir(parents=True, exist_ok=True)
        tag = fetch_checkpoint(url, ckdir)
        if tag is not None:
            print(f"fetched checkpoint {tag} from {url} (files checked against its _files.json)", file=sys.stderr,
                  flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metric lines after STEP (written by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    def step_of(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None  # a line cut short by a kill

    lines = path.read_text().splitlines(keepends=True)
    keep = [l for l in lines if (n := step_of(l)) is not None and n <= step and l.endswith("\n")]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _record_in_run(cfg: TrainConfig, out: Path, data: dict, given: dict, *, status: str, step: int,
                   final: Path | None = None) -> None:
    """The run manifest's `train` entry (when the pack belongs to a run folder)."""
    if not cfg.run_dir:
        return
    from pipeline.runs import update_run

    run_dir = Path(cfg.run_dir).resolve()

    def rel(p: Path | str) -> str:
        p = Path(p).resolve()
        return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)

    entry = {"dir": rel(out), "pack_dir": rel(data["pack_dir"]), "pack_version": data["pack_version"],
             "pack_manifest_sha256": data["pack_manifest_sha256"], "tokenizer_sha256": data["tokenizer_sha256"],
             "config_sha256": given["config_sha256"], "preset": cfg.preset, "arch": cfg.arch,
             "steps": cfg.steps, "step": step, "status": status}
    if final is not None:
        entry["final"] = {"raw": rel(final / "raw"), "ema": rel(final / "ema")}
    update_run(run_dir, train=entry)


def _check(step: int, loss: float, recent: list[float], cfg: TrainConfig, micro: list[Batch], what: str) -> None:
    ids = [sid for mb in micro for row in mb.sample_ids for sid in row]
    seqs = [i for mb in micro for i in mb.seq_index]
    where = f"at step {step + 1} (sequences {seqs[:16]}{' ...' if len(seqs) > 16 else ''}; sample ids {ids[:16]}{' ...' if len(ids) > 16 else ''})"
    if not math.isfinite(loss):
        raise TrainingDiverged(f"non-finite {what} {where}; stopping without writing a checkpoint")
    if len(recent) >= cfg.spike_window:
        med = statistics.median(recent)
        if loss > cfg.spike_factor * med:
            raise TrainingDiverged(
                f"loss spike {loss:.4f} > {cfg.spike_factor} x median {med:.4f} of the last {len(recent)} steps "
                f"{where}; stopping without writing a checkpoint")


def _params_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _save(engine, ema, loader, mcfg, ckdir, out, step, recent, cfg, world, rank, given, export) -> None:
    if not _params_finite(engine.module):
        raise TrainingDiverged(f"non-finite weights after step {step}; not writing a checkpoint")
    tag = f"step-{step:08d}"
    client = {"step": step, "loader": loader.state_dict(), "ema": ema.state_dict(), "rng": _rng_state(),
              "recent_losses": recent}
    if world > 1:
        import torch.distributed as dist

        rngs = [None] * world
        dist.all_gather_object(rngs, client["rng"])
        client["rng"] = rngs
    # DeepSpeed writes `latest` by truncate-then-write; a kill in between would leave it empty.
    # We write it ourselves, atomically, after every rank has finished its files.
    engine.engine.save_checkpoint(str(ckdir), tag=tag, client_state=client, save_latest=False)
    if rank == 0:
        _write_json(ckdir / tag / records.CHECKPOINT_RECORD, {**given, "step": step, "config": cfg.to_dict()})
        tmp = ckdir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckdir / "latest")
        _export(engine.module, ema, mcfg, out / "export" / tag, export)
        tags = sorted(p.name for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[: -cfg.keep_checkpoints]:
            shutil.rmtree(ckdir / old, ignore_errors=True)
            shutil.rmtree(out / "export" / old, ignore_errors=True)
        if cfg.checkpoint_url:  # the tag's files, its _files.json, then latest (pipeline/storage.py)
            from pipeline.storage import publish_checkpoint

            publish_checkpoint(ckdir, tag, cfg.checkpoint_url, keep=tags[-cfg.keep_checkpoints:])


def _export(model, ema, mcfg, folder: Path, export: dict) -> None:
    """Consolidated safetensors of the raw and of the EMA weights (model.save_checkpoint), each with the
    tokenizer files and config.json["data"]."""
    raw = build_model(mcfg)
    raw.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_checkpoint(raw, folder / "raw", data=export["data"], files=export["files"])
    raw.load_state_dict(ema.state_dict())
    save_checkpoint(raw, folder / "ema", data=export["data"], files=export["files"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard not installed: metrics go to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(folder))
