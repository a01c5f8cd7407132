"""Typed configuration of the HRM-Text network and its Transformer baseline.

One dataclass, `ModelConfig`, holds every knob of the network; fields that follow from others
(FFN width, heads, layers per module, the call schedule) are derived in one place,
`__post_init__`, and checked there so an impossible config fails at construction time.

Named presets (`ModelConfig.preset(name)`):
  debug      tiny, for tests (vocab 512, hidden 64, 4 layers, head dim 32)
  cpu-small  the embedded CPU demo (vocab 8192, hidden 256, 4 layers, head dim 64)
  B / L / XL / XXL   the paper's sizes (vocab 65,536, head dim 128); XL is the 1B model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["hrm", "transformer"]
LossMode = Literal["answer", "full"]  # answer-only loss vs full causal LM loss
MaskMode = Literal["prefix", "causal"]  # PrefixLM vs causal attention mask
AttnBackend = Literal["auto", "sdpa", "flex"]


def swiglu_intermediate(hidden_size: int, multiple_of: int = 256) -> int:
    """round(8h/3), then rounded up to a multiple of `multiple_of` (the paper's SwiGLU width)."""
    width = round(8 * hidden_size / 3)
    return multiple_of * math.ceil(width / multiple_of)


@dataclass
class ModelConfig:
    # --- what is built -------------------------------------------------------------------------
    arch: Arch = "hrm"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4  # total blocks; HRM splits them evenly into its H and L modules
    head_dim: int = 32
    ffn_multiple_of: int = 256
    rope_theta: float = 1e4
    norm_eps: float = 1e-6
    max_seq_len: int = 4096  # longest sequence the trainer / generator may feed (no RoPE table is kept)

    # --- HRM recurrence ------------------------------------------------------------------------
    cycles: int = 2  # H calls per forward pass
    l_steps: int = 3  # L calls per cycle
    bp: int = 5  # default number of module calls with gradient (forward(bp=...) overrides)

    # --- objective switches (the paper's ablation) -----------------------------------------------
    loss: LossMode = "answer"
    mask: MaskMode = "prefix"
    attn_backend: AttnBackend = "auto"  # auto: flex on CUDA (no cache), SDPA otherwise

    # --- derived (never passed in; computed by __post_init__) ------------------------------------
    num_heads: int = field(init=False)
    intermediate_size: int = field(init=False)
    h_layers: int = field(init=False)  # blocks in H (HRM) -- 0 for the Transformer
    l_layers: int = field(init=False)  # blocks in L (HRM) -- 0 for the Transformer
    call_names: tuple[str, ...] = field(init=False)  # e.g. ("L0","L1","L2","H0","L3","L4","L5","H1")

    def __post_init__(self) -> None:
        if self.arch not in ("hrm", "transformer"):
            raise ValueError(f"arch must be 'hrm' or 'transformer', got {self.arch!r}")
        if self.loss not in ("answer", "full"):
            raise ValueError(f"loss must be 'answer' or 'full', got {self.loss!r}")
        if self.mask not in ("prefix", "causal"):
            raise ValueError(f"mask must be 'prefix' or 'causal', got {self.mask!r}")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_backend must be auto/sdpa/flex, got {self.attn_backend!r}")
        if self.mask == "prefix" and self.loss == "full":
            # Under a PrefixLM mask a prompt token sees the next prompt token, so predicting it is
            # trivial: the ablation only ever pairs PrefixLM with the answer-only loss.
            raise ValueError("mask='prefix' needs loss='answer' (full LM loss would read the future)")
        if self.hidden_size % self.head_dim != 0:
            raise ValueError(f"hidden_size {self.hidden_size} not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 2 != 0:
            raise ValueError("head_dim must be even for RoPE")
        self.num_heads = self.hidden_size // self.head_dim
        self.intermediate_size = swiglu_intermediate(self.hidden_size, self.ffn_multiple_of)
        if self.arch == "hrm":
            if self.num_layers % 2 != 0:
                raise ValueError(f"HRM needs an even num_layers (half per module), got {self.num_layers}")
            if self.cycles < 1 or self.l_steps < 1:
                raise ValueError("cycles and l_steps must be >= 1")
            self.h_layers = self.l_layers = self.num_layers // 2
            names: list[str] = []
            n_l = n_h = 0
            for _ in range(self.cycles):
                for _ in range(self.l_steps):
                    names.append(f"L{n_l}")
                    n_l += 1
                names.append(f"H{n_h}")
                n_h += 1
            self.call_names = tuple(names)
            self.check_bp(self.bp)
        else:
            self.h_layers = self.l_layers = 0
            self.call_names = ("T0",)

    # --- derived helpers -----------------------------------------------------------------------
    @property
    def num_calls(self) -> int:
        """Module calls per forward pass (8 for the default HRM, 1 for the Transformer)."""
        return len(self.call_names)

    @property
    def layers_per_call(self) -> int:
        return self.num_layers // 2 if self.arch == "hrm" else self.num_layers

    def bp_split(self, bp: int) -> tuple[int, int]:
        """(H_bp, L_bp): how many of the last H calls and the last L calls carry gradient."""
        self.check_bp(bp)
        h_bp = min(self.cycles, bp - 1)
        return h_bp, bp - h_bp

    def check_bp(self, bp: int) -> None:
        if self.arch != "hrm":
            return
        n_h, n_l = self.cycles, self.cycles * self.l_steps
        h_bp = min(n_h, bp - 1)  # the reference's split: H_bp = min(cycles, bp - 1)
        if bp < 2 or bp - h_bp > n_l:
            raise ValueError(
                f"bp={bp} impossible: need 2 <= bp, H_bp=min(cycles,bp-1)={h_bp} of {n_h} H calls, "
                f"L_bp=bp-H_bp <= {n_l} L calls"
            )

    def grad_calls(self, bp: int) -> tuple[str, ...]:
        """Names of the module calls that run with gradient at this bp (in call order)."""
        if self.arch != "hrm":
            return self.call_names
        h_bp, l_bp = self.bp_split(bp)
        h_names = [n for n in self.call_names if n[0] == "H"]
        l_names = [n for n in self.call_names if n[0] == "L"]
        keep = set(h_names[len(h_names) - h_bp :]) | set(l_names[len(l_names) - l_bp :])
        return tuple(n for n in self.call_names if n in keep)

    # --- serialisation / presets ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The init fields only (derived fields are recomputed on load)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PAPER_VOCAB = 65_536

# Init fields per preset; arch / loss / mask default to the paper's HRM-Text recipe.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=512, hidden_size=64, num_layers=4, head_dim=32, max_seq_len=256),
    "cpu-small": dict(vocab_size=8192, hidden_size=256, num_layers=4, head_dim=64, max_seq_len=1024),
    "B": dict(vocab_size=PAPER_VOCAB, hidden_size=1024, num_layers=12, head_dim=128),
    "L": dict(vocab_size=PAPER_VOCAB, hidden_size=1280, num_layers=24, head_dim=128),
    "XL": dict(vocab_size=PAPER_VOCAB, hidden_size=1536, num_layers=32, head_dim=128),
    "XXL": dict(vocab_size=PAPER_VOCAB, hidden_size=1792, num_layers=72, head_dim=128),
}
