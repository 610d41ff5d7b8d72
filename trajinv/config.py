"""Configuration dataclasses: one per concern, a docstring per field.

The CLI builds these; the library only reads them. Data and GNS settings live
beside their code (`trajinv.data.DataConfig`, `trajinv.gns.GNSConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from trajinv.gns import GNSConfig


@dataclass(frozen=True)
class ModelConfig:
    """A GPT with SwiGLU, RoPE, RMSNorm and untied embeddings."""

    d_model: int = 64
    """Residual width."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model, head dim must be even (RoPE)."""
    context: int = 64
    """Sequence length trained on (and the RoPE table size)."""
    vocab_size: int | None = None
    """Embedding rows; None takes the data's vocabulary (256 for bytes)."""
    d_ff: int | None = None
    """SwiGLU hidden width; None gives 8/3 d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get std / sqrt(2 n_layers)."""

    @property
    def hidden(self) -> int:
        return self.d_ff if self.d_ff is not None else -(-8 * self.d_model // 3 // 64) * 64

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "context"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size"
            )


PRESETS: dict[str, ModelConfig] = {
    # The CPU demo: trains a 9-member population for 800 steps in a few minutes on 2 cores.
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, context=64),
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, context=256),
    # The paper's 164M model: GPT-2 vocabulary padded to a multiple of 64.
    "gpt-164m": ModelConfig(d_model=768, n_layers=12, n_heads=12, context=1024, vocab_size=50304),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with field overrides; one-line error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


PARAM_KINDS = ("matrix", "embedding", "gain")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings shared by every member (lr and wd are per member, see Member)."""

    name: str = "fused"
    """'fused' (trajinv.optim.FusedAdamW, one launch per step) or 'torch' (torch.optim.AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    clip: float = 1.0
    """Per-member global grad-norm clip; 0 disables."""
    decay: tuple[str, ...] = ("matrix", "embedding")
    """Parameter kinds that get weight decay (kinds: matrix, embedding, gain)."""
    decay_mode: str = "torch"
    """'torch': p *= 1 - lr*wd each step (ELR = lr*wd); 'independent': p *= 1 - wd*schedule."""

    def validate(self) -> None:
        if self.name not in ("fused", "torch"):
            raise ValueError(f"unknown optimizer {self.name!r}; choose fused or torch")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0, got {self.clip}")
        bad = [k for k in self.decay if k not in PARAM_KINDS]
        if bad:
            raise ValueError(f"unknown parameter kind(s) {bad} in decay; kinds are {PARAM_KINDS}")
        if self.decay_mode not in ("torch", "independent"):
            raise ValueError(f"unknown decay_mode {self.decay_mode!r}; choose torch or independent")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate multiplier over a run: warmup, then constant, cosine or WSD."""

    kind: str = "constant"
    """'constant', 'cosine' or 'wsd' (warmup-stable-decay)."""
    warmup: int = 50
    """Linear warmup steps from 0 to the peak."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final linear decay."""
    min_ratio: float = 0.0
    """Cosine and WSD end at this fraction of the peak."""

    def validate(self) -> None:
        if self.kind not in ("constant", "cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.kind!r}; choose constant, cosine or wsd")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must lie in [0, 1], got {self.min_ratio}")


@dataclass(frozen=True)
class Member:
    """One member of a population: the optimizer hyperparameters that differ."""

    lr: float
    """Peak learning rate."""
    wd: float
    """Weight decay (torch convention: decay per step is lr * wd)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.wd >= 0:
            raise ValueError(f"weight decay must be >= 0, got {self.wd}")

    @property
    def elr(self) -> float:
        return self.lr * self.wd

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},wd={self.wd:g}"


@dataclass(frozen=True)
class TrainConfig:
    """One population run: K members sharing model, data order and batch sizes."""

    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    """Architecture."""
    members: tuple[Member, ...] = (Member(8e-3, 1.0),)
    """The population; K = len(members); K = 1 is an ordinary run."""
    steps: int = 800
    """Optimizer steps."""
    batch_size: str = "32"
    """Sequences per step, or a schedule 'B1@f1,B2' (B1 until fraction f1 of the steps, then B2)."""
    micro_batch: int = 0
    """Largest micro-batch per forward/backward (gradient accumulation); 0 = whole batch."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end)."""
    eval_seqs: int = 512
    """Validation sequences (fixed set); 512 x 64 tokens gives a loss with noise ~0.005 on bytes."""
    log_every: int = 10
    """Write a metrics line every N steps (and at every eval)."""
    checkpoint_every: int = 200
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    seed: int = 0
    """Seeds initialisation and batch order (shared by all members)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    dtype: str = "fp32"
    """'fp32' or 'bf16' (autocast; parameters and optimizer state stay fp32)."""
    gns: GNSConfig = field(default_factory=GNSConfig)
    """Gradient-noise-scale measurement (off by default: then it costs nothing)."""
    kernels: str = "auto"
    """Backend of the fused optimizer and GNS kernels: 'auto' (Triton on CUDA, CPU paths
    on CPU), 'triton' (forced; on CPU only under TRITON_INTERPRET=1, which the tests use
    to run the GPU code path) or 'torch' (the CPU/torch paths)."""

    def validate(self) -> None:
        self.model.validate()
        self.optim.validate()
        self.schedule.validate()
        if not self.members:
            raise ValueError("a population needs at least one member")
        for name in ("steps", "eval_every", "eval_seqs", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.micro_batch < 0 or self.checkpoint_every < 0:
            raise ValueError(f"micro_batch and checkpoint_every must be >= 0, got {self.micro_batch}, {self.checkpoint_every}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"unknown kernels backend {self.kernels!r}; choose auto, triton or torch")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose fp32 or bf16")


def to_dict(obj: Any) -> Any:
    """A JSON-ready view of a (nested) config dataclass."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
