import pytest
import torch

from model import PRESETS, ModelConfig, build_model, swiglu_intermediate

# the paper's sizes: (layers, hidden, heads)
PAPER = {"B": (12, 1024, 8), "L": (24, 1280, 10), "XL": (32, 1536, 12), "XXL": (72, 1792, 14)}


def expected_params(layers: int, h: int, vocab: int, ffn_multiple: int = 256) -> int:
    """Hand formula: untied embedding + LM head (2*V*h); per block the fused [q|k|v|gate]
    projection (4h*h), the output projection (h*h), SwiGLU gate+up (2*h*I) and down (I*h);
    no biases, no norm weights."""
    inter = -(-round(8 * h / 3) // ffn_multiple) * ffn_multiple
    return 2 * vocab * h + layers * (4 * h * h + h * h + 3 * h * inter)


def count(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # no memory, no init cost
        return build_model(cfg).num_parameters()


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("arch", ["hrm", "transformer"])
def test_preset_parameter_counts(name, arch):
    cfg = ModelConfig.preset(name, arch=arch)
    assert count(cfg) == expected_params(cfg.num_layers, cfg.hidden_size, cfg.vocab_size)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_the_paper(name):
    layers, hidden, heads = PAPER[name]
    cfg = ModelConfig.preset(name)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (layers, hidden, heads, 128)
    assert cfg.vocab_size == 65_536 and cfg.rope_theta == 1e4 and cfg.norm_eps == 1e-6
    assert cfg.h_layers == cfg.l_layers == layers // 2
    assert cfg.intermediate_size % 256 == 0 and cfg.intermediate_size >= 8 * hidden / 3


def test_intermediate_sizes():
    assert [swiglu_intermediate(h) for h in (1024, 1280, 1536, 1792)] == [2816, 3584, 4096, 4864]


def test_xl_is_about_one_billion():
    cfg = ModelConfig.preset("XL")
    with torch.device("meta"):
        m = build_model(cfg)
    body = m.num_parameters(exclude_embeddings=True)
    assert abs(body - 1e9) / 1e9 < 0.05, body  # 0.98B in the blocks
    assert 1.0e9 < m.num_parameters() < 1.25e9  # 1.18B with the untied 65k embedding and head


def test_call_schedule_and_bp_split():
    cfg = ModelConfig.preset("debug")
    assert cfg.call_names == ("L0", "L1", "L2", "H0", "L3", "L4", "L5", "H1")
    assert cfg.num_calls == 8 and cfg.layers_per_call == 2
    assert cfg.bp_split(2) == (1, 1) and cfg.bp_split(5) == (2, 3)
    assert cfg.grad_calls(2) == ("L5", "H1")
    assert cfg.grad_calls(5) == ("H0", "L3", "L4", "L5", "H1")
    assert cfg.grad_calls(8) == cfg.call_names
    for bad in (0, 1, 9):
        with pytest.raises(ValueError):
            cfg.bp_split(bad)


def test_invalid_configs_fail_early():
    with pytest.raises(ValueError, match="prefix"):
        ModelConfig.preset("debug", loss="full", mask="prefix")
    with pytest.raises(ValueError):
        ModelConfig.preset("debug", hidden_size=70)
    with pytest.raises(ValueError):
        ModelConfig.preset("debug", num_layers=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(TypeError):
        ModelConfig(num_heads=4)  # derived fields are not inputs
    ModelConfig.preset("debug", loss="full", mask="causal")  # the ablation's first row is valid


def test_round_trip_dict():
    cfg = ModelConfig.preset("cpu-small", arch="transformer", mask="causal")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.num_heads == 4 and again.intermediate_size == 768
