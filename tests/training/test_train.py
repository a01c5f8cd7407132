"""The training stage end to end on CPU: a real DeepSpeed engine over gloo, real packed GSM8K data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import TrainConfig, TrainingDiverged, train
from training.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without the torch.distributed variables the in-process runs set
    (a child must pick its own free port)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def cfg(packed, out, **kw) -> TrainConfig:
    base = dict(shards=str(packed), out=str(out), preset="debug", steps=30, micro_batch_size=4, grad_accum=2,
                lr=3e-3, warmup_steps=5, ema_decay=0.9, progress=False, tensorboard=False, seed=11)
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_deepspeed_lowers_loss_and_matches_plain_pytorch(packed, tmp_path):
    ds = train(cfg(packed, tmp_path / "ds", engine="deepspeed", zero_stage=1))
    train(cfg(packed, tmp_path / "pt", engine="torch"))
    a, b = losses(tmp_path / "ds"), losses(tmp_path / "pt")
    assert len(a) == len(b) == 30 and ds["steps"] == 30
    assert sum(a[-5:]) / 5 < a[0] - 1.0, f"answer loss did not fall: {a[0]:.3f} -> {a[-5:]}"
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-5, atol=0)
    rec = [json.loads(l) for l in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bp"] for r in rec[:7]] == [2, 2, 3, 3, 4, 4, 5]  # 2 -> 5 over the first 20% (6 steps)
    assert all(r["grad_norm"] > 0 and r["answer_tokens"] > 0 and r["flops"] > 0 for r in rec)
    run = json.loads((tmp_path / "ds" / "train.json").read_text())
    assert run["data"]["pack_manifest_sha256"] and run["data"]["tokenizer_sha256"] and run["config_sha256"]
    assert run["code"]["git_sha"] and run["config"]["steps"] == 30
    assert run["deepspeed_config"]["zero_optimization"]["stage"] == 1
    assert run["model_config"]["vocab_size"] == 512  # the tokenizer's, found through the pack manifest
    for kind in ("raw", "ema"):
        assert (Path(ds["final_" + kind]) / "model.safetensors").exists()
    assert not same_weights(Path(ds["final_raw"]), Path(ds["final_ema"]))


def test_transformer_zero2_with_peak_flops(packed, tmp_path):
    s = train(cfg(packed, tmp_path / "tf", arch="transformer", zero_stage=2, steps=3, peak_flops=1e12))
    rec = [json.loads(l) for l in (tmp_path / "tf" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 3 and all(r["bp"] is None and 0 < r["mfu"] < 1 for r in rec)
    assert (Path(s["final_raw"]) / "model.safetensors").exists()


def test_nan_stops_without_poisoned_checkpoint(packed, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 4 .*sample ids \['gsm8k/"):
        train(cfg(packed, out, steps=10, save_every=2, fail_at_step=3))
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-00000002"]
    assert not (out / "final").exists()
    assert len(losses(out)) == 3


def _cli_args(packed, out) -> list[str]:
    return ["--shards", str(packed), "--out", str(out), "--preset", "debug", "--steps", "24",
            "--micro-batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "5",
            "--ema-decay", "0.9", "--save-every", "4", "--seed", "5", "--no-progress"]


def test_kill_9_then_rerun_equals_uninterrupted_run(packed, tmp_path):
    env = child_env()
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training", *_cli_args(packed, killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step-00000008":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    # rerun the same command: resumes from the last checkpoint, runs to the end
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["start_step"] >= 8
    # the uninterrupted run, in this process through the same CLI
    whole = tmp_path / "whole"
    assert main(_cli_args(packed, whole)) == 0
    for kind in ("raw", "ema"):
        assert same_weights(killed / "final" / kind, whole / "final" / kind), f"{kind} weights differ"
    assert losses(whole)[-1] == losses(killed)[-1]


def test_single_rank_skips_shm_comm_build(packed, tmp_path):
    """World size 1 on CPU does not compile DeepSpeed's shm_comm op (default shm_comm='auto')."""
    ext = tmp_path / "ext"
    env = child_env(TORCH_EXTENSIONS_DIR=str(ext))
    r = subprocess.run([sys.executable, "-m", "training", "--shards", str(packed), "--out", str(tmp_path / "o"),
                        "--steps", "1", "--warmup-steps", "0", "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(ext.glob("**/*.so")) and "compiling DeepSpeed" not in r.stderr


def test_cli_reports_corrupt_shard(packed, tmp_path, capsys):
    import shutil

    bad = tmp_path / "pack"
    shutil.copytree(packed, bad)
    (bad / "shard-00000.arrow").write_bytes(b"\0" + (bad / "shard-00000.arrow").read_bytes()[1:])
    code = main(["--shards", str(bad), "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress"])
    assert code == 1 and "shard-00000.arrow failed its checksum" in capsys.readouterr().err


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks_match_one_rank(packed, tmp_path):
    """`deepspeed --num_gpus 2 --module training ...` on CPU (gloo + shm_comm, built once and cached):
    2 ranks x micro batch 2 see the same sequences per step as 1 rank x micro batch 2 x accumulation 2."""
    launcher = Path(sys.executable).parent / "deepspeed"
    common = ["--shards", str(packed), "--steps", "6", "--micro-batch-size", "2", "--lr", "3e-3",
              "--warmup-steps", "2", "--no-progress", "--seed", "9"]
    two = tmp_path / "two"
    r = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "training",
                        "--out", str(two), *common], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert json.loads((two / "train.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    assert main(["--out", str(one), "--grad-accum", "2", *common]) == 0
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=0)


def _free_port() -> int:
    from training.distributed import free_port

    return free_port()


def test_bf16_on_cpu_and_config_errors(packed, tmp_path):
    s = train(cfg(packed, tmp_path / "bf16", precision="bf16", steps=3))
    assert all(map(lambda x: x == x, losses(tmp_path / "bf16")))  # finite (not NaN)
    w = load_file(str(Path(s["final_ema"]) / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())
    with pytest.raises(ValueError, match="zero_stage"):
        cfg(packed, tmp_path / "x", zero_stage=3)
    with pytest.raises(ValueError, match="unknown preset"):
        cfg(packed, tmp_path / "x", preset="nope")
