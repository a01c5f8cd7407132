"""What a train folder is made from: resume only on the same pack, tokenizer and config (else refuse,
or --restart into a new folder); exports carry their tokenizer; `hrm train RUN_DIR`; the rendezvous
listens on nothing a network can reach."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from model import load_checkpoint
from model.checkpoint import load_data_record
from training.cli import main
from training.distributed import Rendezvous, free_port, make_store, rendezvous

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FAST = ["--preset", "debug", "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1", "--ema-decay", "0.9",
        "--seed", "3", "--no-progress"]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build_chain(run_stage, dedup: Path, d: Path, vocab: int) -> Path:
    """tokenizer (vocab) -> mix -> pack into d/{t,m,p}; rerunning with another vocab rewrites them in place
    (as a data rerun does in a run folder without versions)."""
    run_stage("stage", "tokenizer", "--input", str(dedup), "--output", str(d / "t"), "--set", f"vocab_size={vocab}",
              "--no-progress")
    run_stage("stage", "mix", "--input", str(d / "t"), "--output", str(d / "m"), "--no-progress")
    run_stage("stage", "pack", "--input", str(d / "t"), "--mix", str(d / "m"), "--output", str(d / "p"),
              "--set", "seq_len=256", "--set", "shard_tokens=8192", "--no-progress")
    return d / "p"


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_refused_on_other_data_then_restart_in_a_new_folder(packed, run_stage, tmp_path, capsys):
    pack = build_chain(run_stage, packed.parent / "d", tmp_path / "data", 512)
    out = tmp_path / "train"
    args = [str(pack), "--out", str(out), "--steps", "2", "--save-every", "1", *FAST]
    assert main(args) == 0
    first = json.loads((out / "train.json").read_text())
    old_pack, old_tok = first["data"]["pack_manifest_sha256"], first["data"]["tokenizer_sha256"]
    assert old_tok == sha256(tmp_path / "data" / "t" / "tokenizer.json")
    ck = json.loads((out / "checkpoints" / "step-00000002" / "train_record.json").read_text())
    assert (ck["data"], ck["config_sha256"]) == (first["data"], first["config_sha256"])
    capsys.readouterr()

    # a data rerun rewrites tokenizer and pack in place; the same command must not resume on them
    build_chain(run_stage, packed.parent / "d", tmp_path / "data", 384)
    new_tok = sha256(tmp_path / "data" / "t" / "tokenizer.json")
    assert new_tok != old_tok
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"pack_manifest_sha256 recorded {old_pack[:16]}" in err and f"tokenizer_sha256 recorded {old_tok[:16]}" in err
    assert f"but given {new_tok[:16]}" in err and "--restart" in err
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002" and len(metrics(out)) == 2

    # --restart: a fresh run in the next free folder, the old one untouched
    assert main([*args, "--restart"]) == 0
    err = capsys.readouterr().err
    new = tmp_path / "train-2"
    assert f"this run writes {new}" in err
    rec = json.loads((new / "train.json").read_text())
    assert rec["data"]["tokenizer_sha256"] == new_tok and rec["start_step"] == 0
    assert rec["model_config"]["vocab_size"] == 384
    assert json.loads((out / "train.json").read_text()) == first and len(metrics(out)) == 2

    # another setting is refused too (naming it); a longer --steps extends the run
    assert main([str(pack), "--out", str(new), "--steps", "2", *FAST, "--lr", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert f"config_sha256 recorded {rec['config_sha256'][:16]}" in err and "train.lr 0.003 -> 0.001" in err
    assert main([str(pack), "--out", str(new), "--steps", "3", *FAST]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "at step 2" in err
    assert [m["step"] for m in metrics(new)] == [1, 2, 3]


def test_exports_carry_tokenizer_and_data_record(packed, tmp_path):
    out = tmp_path / "t"
    assert main(["--shards", str(packed), "--out", str(out), "--steps", "2", "--save-every", "1", *FAST]) == 0
    rec = json.loads((out / "train.json").read_text())
    tok = Path(rec["data"]["tokenizer_dir"])
    assert tok == (packed.parent / "t").resolve()
    for folder in ("final/raw", "final/ema", "export/step-00000001/ema", "export/step-00000002/raw"):
        d = out / folder
        for name in ("tokenizer.json", "tokenizer_meta.json"):
            assert (d / name).read_bytes() == (tok / name).read_bytes(), f"{folder}/{name}"
        data = json.loads((d / "config.json").read_text())["data"]
        assert data == {"tokenizer_sha256": sha256(d / "tokenizer.json"),
                        "pack_manifest_sha256": rec["data"]["pack_manifest_sha256"],
                        "pack_dir": str(packed.resolve()), "tokenizer_dir": str(tok)}
        assert load_checkpoint(d).cfg.vocab_size == 512


def test_older_exports_without_data_still_load(tmp_path):
    from model import ModelConfig, build_model, save_checkpoint

    save_checkpoint(build_model(ModelConfig.preset("debug")), tmp_path / "old")
    assert load_data_record(tmp_path / "old") is None
    assert load_checkpoint(tmp_path / "old").cfg.vocab_size == 512


def test_train_run_folder_records_itself_and_resumes_from_the_train_folder(packed, run_stage, tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": 1, "spec": "demo",
                                              "stages": {"pack": {"dir": str(packed.resolve())}}}))
    assert main([str(run), "--steps", "2", *FAST]) == 0
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines()[-1] == f"next: hrm eval {run.resolve()} --benchmarks BENCH_DIR --limit 20"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["spec"] == "demo" and manifest["stages"]["pack"]["dir"] == str(packed.resolve())
    entry = manifest["train"]
    assert entry["dir"] == "train" and entry["status"] == "done" and entry["final"]["ema"] == "train/final/ema"
    pack_manifest = json.loads((packed / "manifest.json").read_text())
    assert entry["pack_version"] == pack_manifest["fingerprint"][:16]
    assert (run / "train" / "final" / "ema" / "model.safetensors").exists()
    # the train folder itself: resumes on the pack it records, and may go further
    assert main([str(run / "train"), "--steps", "3", *FAST]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["train"]["step"] == 3
    # the run moves on to a new pack version: refused, pointing at the recorded pack, which still resumes
    run_stage("stage", "pack", "--input", str(packed.parent / "t"), "--mix", str(packed.parent / "m"), "--output",
              str(tmp_path / "p2"), "--set", "seq_len=128", "--set", "shard_tokens=8192", "--no-progress")
    capsys.readouterr()
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["pack"]["dir"] = str(tmp_path / "p2")
    (run / "run.json").write_text(json.dumps(manifest))
    assert main([str(run), "--steps", "4", *FAST]) == 1
    err = capsys.readouterr().err
    assert "pack_manifest_sha256 recorded" in err and f"or --shards {packed.resolve()} to continue" in err
    assert "tokenizer_sha256" not in err  # the same tokenizer
    assert main([str(run / "train"), "--shards", str(packed), "--steps", "4", *FAST]) == 0
    assert "at step 3" in capsys.readouterr().err
    assert main([str(run), "--out", str(tmp_path / "x"), "--shards", str(packed)]) == 2
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the rendezvous
# ----------------------------------------------------------------------------------------------
def _address(hexaddr: str) -> ipaddress._BaseAddress:
    b = bytes.fromhex(hexaddr)
    if len(b) == 4:
        return ipaddress.IPv4Address(b[::-1])
    return ipaddress.IPv6Address(b"".join(b[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets process PID listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        p = Path(f"/proc/{pid}/net/{table}")
        for line in p.read_text().splitlines()[1:] if p.exists() else []:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                found.append((str(_address(addr)), int(port, 16)))
    return found


def loopback(addr: str) -> bool:
    a = ipaddress.ip_address(addr)
    return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_single_process_run_listens_on_nothing_reachable(packed, tmp_path):
    """A real one-process DeepSpeed run: no rendezvous port (HashStore); gloo's own pair sockets on
    127.0.0.1 only. (torch's env:// TCPStore listened on every interface.)"""
    code = (f"from training import TrainConfig, train\n"
            f"train(TrainConfig(shards={str(packed)!r}, out={str(tmp_path / 'o')!r}, steps=1, warmup_steps=0, "
            f"micro_batch_size=2, progress=False, tensorboard=False))\n"
            "import sys, torch.distributed as dist\n"
            "s = dist.distributed_c10d._get_default_store()\n"
            "while isinstance(s, dist.PrefixStore):\n    s = s.underlying_store\n"
            "print('ready', type(s).__name__, flush=True)\n"
            "sys.stdin.read()\n")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS + ("GLOO_SOCKET_IFNAME",)}
    with open(tmp_path / "stderr.log", "w") as err:  # a pipe nobody reads would fill up and block the child
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        line = ""
        for line in proc.stdout:  # DeepSpeed may print on stdout first
            if line.startswith("ready"):
                break
        assert line.startswith("ready"), (tmp_path / "stderr.log").read_text()[-3000:]
        socks = listening(proc.pid)
    finally:
        proc.communicate("", timeout=60)
        watchdog.cancel()
    assert all(loopback(a) for a, _ in socks), socks
    assert "HashStore" in line


def test_rendezvous_from_the_environment():
    assert rendezvous({}) == Rendezvous("local")
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    r = rendezvous(launcher)
    assert (r.kind, r.rank, r.world_size, r.local_rank, r.host, r.port) == ("tcp", 1, 2, 1, "127.0.0.1", 29511)
    assert r.loopback and not rendezvous({**launcher, "MASTER_ADDR": "192.0.2.7"}).loopback
    assert rendezvous({**launcher, "TORCHELASTIC_RUN_ID": "x"}).kind == "env"
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rendezvous({"RANK": "0"})


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_launcher_store_binds_master_addr_only():
    import torch.distributed as dist

    assert isinstance(make_store(Rendezvous("local")), dist.HashStore)
    port = free_port()
    server = make_store(Rendezvous("tcp", 0, 1, 0, "127.0.0.1", port))
    server.set("k", "v")
    assert dist.TCPStore("127.0.0.1", port, None, False).get("k") == b"v"
    assert [a for a, p in listening(os.getpid()) if p == port] == ["127.0.0.1"]
