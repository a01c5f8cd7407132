"""At bp = 2 no gradient reaches the embedding: every engine must leave it untouched (no weight decay,
no Adam step), as the reference skips parameters without a gradient. The torch engine keeps grad None;
DeepSpeed ZeRO 1/2 hands the optimizer the embedding's own flat partition with an all-zero gradient,
which AdamAtan2(skip_zero_grad=True) skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import ModelConfig, build_model
from training import TrainConfig, train


def run_bp2(packed, out: Path, **kw) -> tuple[dict, dict]:
    cfg = TrainConfig(shards=str(packed), out=str(out), preset="debug", steps=2, micro_batch_size=2, grad_accum=1,
                      lr=1e-2, warmup_steps=0, weight_decay=5.0, bp_start=2, bp_end=2, progress=False,
                      tensorboard=False, seed=5, **kw)
    s = train(cfg)
    run = json.loads((out / "train.json").read_text())
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    init = build_model(ModelConfig.from_dict(run["model_config"])).state_dict()
    return init, load_file(str(Path(s["final_raw"]) / "model.safetensors"))


@pytest.mark.parametrize("engine,zero", [("torch", 0), ("deepspeed", 1), ("deepspeed", 2)])
def test_embedding_is_not_decayed_without_gradient(packed, tmp_path, engine, zero):
    init, final = run_bp2(packed, tmp_path / f"{engine}{zero}", engine=engine, zero_stage=zero)
    assert torch.equal(final["embed.weight"], init["embed.weight"]), "the embedding moved at bp = 2"
    # the rest did learn (and decay: 1 - lr * wd = 0.95 per step)
    assert not torch.equal(final["lm_head.weight"], init["lm_head.weight"])
