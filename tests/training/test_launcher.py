"""Training across ranks and nodes through DeepSpeed's launcher, as `hrm train --num-gpus/--hostfile/...`
and the pipeline's train step start it.

The two-node test plays two hosts on this machine: a hostfile with two hosts of one slot each and
`hrm train --hostfile H --node-rank N --master-addr 127.0.0.1` started once per host (DeepSpeed's
`--no_ssh` mode, the way Slurm or a container scheduler starts every node), both writing one train
folder (the shared filesystem of a real cluster). Two ranks with micro batch 2 see the same sequences
per step as one rank with micro batch 2 x accumulation 2, so their losses are equal; a crash after a
checkpoint is resumed by rerunning the same commands and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.cli import main
from training.distributed import Launch, free_port, read_hostfile

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": str(ROOT)}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _hostfile(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_launch_commands_and_hostfile_errors(tmp_path):
    py = "/py"
    assert Launch().command(python=py) == [py, "-m", "training"]
    local = Launch(num_gpus=4).command(python=py)
    assert local[:3] == [py, "-m", "deepspeed.launcher.runner"] and local[-2:] == ["--module", "training"]
    assert local[local.index("--master_addr") + 1] == "127.0.0.1"  # loopback unless told otherwise
    assert local[local.index("--master_port") + 1] == "29500" and "4" in local

    two = _hostfile(tmp_path / "hosts", "# the paper's 16 GPUs\nnode-a slots=8\nnode-b slots=8  # second\n")
    assert read_hostfile(two) == {"node-a": 8, "node-b": 8}
    assert Launch(hostfile=two).world_size == 16
    ssh = Launch(hostfile=two, master_addr="10.0.0.1", master_port=29600).command(python=py)
    assert ssh[ssh.index("--hostfile") + 1] == two and ssh[ssh.index("--master_addr") + 1] == "10.0.0.1"
    assert "--no_ssh" not in ssh
    inferred = Launch(hostfile=two).command(python=py)  # DeepSpeed asks the first host for its address
    assert "--master_addr" not in inferred
    per_node = Launch(hostfile=two, master_addr="10.0.0.1", node_rank=1).command(python=py)
    assert per_node[per_node.index("--node_rank") + 1] == "1" and "--no_ssh" in per_node

    with pytest.raises(ValueError, match="loopback address but .* lists 2 hosts"):
        Launch(hostfile=two, master_addr="127.0.0.1").command(python=py)
    with pytest.raises(ValueError, match="needs master_addr"):
        Launch(hostfile=two, node_rank=0).check()
    with pytest.raises(ValueError, match="node_rank 2 is not a host"):
        Launch(hostfile=two, master_addr="10.0.0.1", node_rank=2).check()
    with pytest.raises(ValueError, match="not both"):
        Launch(num_gpus=2, hostfile=two)
    with pytest.raises(ValueError, match="node_rank needs a hostfile"):
        Launch(node_rank=0)
    bad = _hostfile(tmp_path / "bad", "node-a slots=8\nnode-b 8\n")
    with pytest.raises(ValueError, match=r"bad:2: expected 'HOSTNAME slots=N'"):
        read_hostfile(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_hostfile(tmp_path / "missing")


def test_pipeline_train_step_uses_the_same_launch(tmp_path):
    from flows.pipeline_flow import TrainSettings

    hosts = _hostfile(tmp_path / "hosts", "node-a slots=8\nnode-b slots=8\n")
    one = TrainSettings()
    assert one.launcher()[1:] == ["-m", "training"]
    multi = TrainSettings(hostfile=hosts, master_addr="10.0.0.1")
    cmd = multi.launcher()
    assert cmd[cmd.index("--hostfile") + 1] == hosts and cmd[-2:] == ["--module", "training"]
    # where the ranks run does not change the weights, how many do (the global batch)
    assert TrainSettings(hostfile=hosts, master_addr="10.0.0.2").identity() == multi.identity()
    assert multi.identity()["world_size"] == 16 and "world_size" not in one.identity()


def test_cli_rejects_launch_options_under_a_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        main(["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--num-gpus", "2"])
    assert "already runs under one" in capsys.readouterr().err


@pytest.mark.slow
def test_two_nodes_without_ssh_train_checkpoint_resume_match_one_rank(packed, tmp_path):
    hosts = _hostfile(tmp_path / "hostfile", "node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "two"
    common = ["--shards", str(packed), "--steps", "6", "--micro-batch-size", "2", "--lr", "3e-3",
              "--warmup-steps", "2", "--save-every", "3", "--keep-checkpoints", "2", "--no-progress", "--seed", "9"]

    def two_nodes() -> list[subprocess.CompletedProcess]:
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "training", "--out", str(out), *common, "--hostfile", hosts,
                                   "--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", port],
                                  cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in (0, 1)]
        done = []
        for p in procs:
            so, se = p.communicate(timeout=400)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
        for r in done:
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return done

    first = two_nodes()
    assert "--no_ssh" in first[0].stderr and "--node_rank 1" in first[1].stderr  # the launch line printed
    rec = json.loads((out / "train.json").read_text())
    assert rec["world_size"] == 2 and rec["start_step"] == 0
    one = tmp_path / "one"
    assert main(["--out", str(one), "--grad-accum", "2", *common]) == 0
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(one)), rtol=1e-5, atol=0)
    whole = {k: v.clone() for k, v in _weights(out / "final" / "raw").items()}

    # a crash after the step-3 checkpoint: the last checkpoint and the exports are gone
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000003", "step-00000006"]
    shutil.rmtree(ck / "step-00000006")
    shutil.rmtree(out / "final")
    (ck / "latest").write_text("step-00000003")
    second = two_nodes()
    assert "resuming from" in second[0].stderr
    assert json.loads((out / "train.json").read_text())["start_step"] == 3
    again = _weights(out / "final" / "raw")
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(one)), rtol=1e-5, atol=0)
