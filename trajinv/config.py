"""Configuration dataclasses: one per concern, a docstring per field, the one source of defaults.

The CLI builds these (its options take their defaults, types, choices and help
text from the fields here: `field_doc`, `choices`); the library only reads them.
Choices are typed as `Literal`, so a checker and the CLI see the same list.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import textwrap
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from trajinv.kernels.backend import ALIASES as BACKEND_ALIASES
from trajinv.kernels.backend import Backend

if TYPE_CHECKING:
    from trajinv.schedules import BatchPlan

ParamKind = Literal["matrix", "embedding", "gain"]
PARAM_KINDS: tuple[str, ...] = get_args(ParamKind)


# --------------------------------------------------------------------- helpers


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass (its docstring), by name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_doc(cls: type, name: str) -> str:
    """The docstring of field `name` of dataclass `cls` ('' when it has none)."""
    return _field_docs(cls).get(name, "")


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a `Literal`-typed field (empty for any other type)."""
    hint = get_type_hints(cls)[name]
    return get_args(hint) if get_origin(hint) is Literal else ()


def default(cls: type, name: str) -> Any:
    """A field's default value (its factory called for mutable defaults)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_finite(name: str, value: Any, low: float = -math.inf, *, strict: bool = False) -> None:
    """One-line ValueError unless `value` is a finite number >= low (> low when `strict`)."""
    ok = _is_number(value) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def _check_choices(obj: Any) -> None:
    """One-line ValueError for any Literal field of `obj` holding a value outside its choices."""
    for f in fields(obj):
        allowed = choices(type(obj), f.name)
        if allowed and getattr(obj, f.name) not in allowed:
            raise ValueError(f"unknown {f.name} {getattr(obj, f.name)!r}; choose {', '.join(allowed)}")


# ----------------------------------------------------------------------- model


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
        for name in ("vocab_size", "d_ff"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"model {name} must be an int >= 1 (or None), got {v!r}")
        check_finite("model rope_theta", self.rope_theta, 0.0, strict=True)
        check_finite("model norm_eps", self.norm_eps, 0.0)
        check_finite("model init_std", self.init_std, 0.0)


PRESETS: dict[str, ModelConfig] = {
    # The CPU demo: trains a 9-member population for 800 steps in a few minutes on 2 cores.
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, context=64),
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, context=256),
    # The paper's 164M model: GPT-2 vocabulary padded to a multiple of 64.
    "gpt-164m": ModelConfig(d_model=768, n_layers=12, n_heads=12, context=1024, vocab_size=50304),
}
DEFAULT_PRESET = "tiny"


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with field overrides; one-line error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# ------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings shared by every member (lr and wd are per member, see Member)."""

    name: Literal["fused", "torch"] = "fused"
    """'fused' (trajinv.optim.FusedAdamW: Triton on CUDA, the native CPU path on CPU) or
    'torch' (torch.optim.AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    clip: float = 1.0
    """Per-member global grad-norm clip; 0 disables."""
    decay: tuple[ParamKind, ...] = ("matrix", "embedding")
    """Parameter kinds that get weight decay (kinds: matrix, embedding, gain)."""
    decay_mode: Literal["torch", "independent"] = "torch"
    """torch: p *= 1 - lr*wd each step (ELR = lr*wd); independent: p *= 1 - wd*schedule."""

    def validate(self) -> None:
        _check_choices(self)
        if len(self.betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        check_finite("eps", self.eps, 0.0)
        check_finite("clip", self.clip, 0.0)
        bad = [k for k in self.decay if k not in PARAM_KINDS]
        if bad:
            raise ValueError(f"unknown parameter kind(s) {bad} in decay; kinds are {PARAM_KINDS}")

    def peak_decay(self, m: "Member") -> float:
        """The fraction of the weights decoupled decay removes per step at the peak lr: lr*wd (torch
        mode) or wd (independent); 0 when no kind decays. This is the member's ELR as the metrics and
        summaries log it (its inverse the timescale tau_iter), so that iso-ELR means equal decay per
        step in either mode. At 1 or more it zeroes or flips the decayed weights every step."""
        if not self.decay:
            return 0.0
        return m.wd if self.decay_mode == "independent" else m.lr * m.wd


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate multiplier over a run: warmup, then constant, cosine or WSD."""

    kind: Literal["constant", "cosine", "wsd"] = "constant"
    """Learning-rate schedule after warmup: constant, cosine or wsd (warmup-stable-decay)."""
    warmup: int = 50
    """Linear warmup steps from 0 to the peak."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final linear decay."""
    min_ratio: float = 0.0
    """Cosine and WSD end at this fraction of the peak."""

    def validate(self) -> None:
        _check_choices(self)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must lie in [0, 1], got {self.min_ratio}")

    def decay_steps(self, total: int) -> int:
        """WSD: the steps of the final decay in a `total`-step run (the last ones)."""
        return int(round(self.decay_fraction * total))


@dataclass(frozen=True)
class Member:
    """One member of a population: the optimizer hyperparameters that differ."""

    lr: float = 8e-3
    """Peak learning rate."""
    wd: float = 1.0
    """Weight decay: the decay per step is lr * wd in torch mode (`OptimConfig.decay_mode`), wd in
    independent mode."""

    def __post_init__(self) -> None:
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (_is_number(self.wd) and math.isfinite(self.wd) and self.wd >= 0):
            raise ValueError(f"weight decay must be a finite number >= 0, got {self.wd!r}")

    @property
    def elr(self) -> float:
        """lr * wd: the ELR in torch mode; `OptimConfig.peak_decay` gives it in either mode."""
        return self.lr * self.wd

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},wd={self.wd:g}"


def sweep_pairs(lrs=(), wds=(), elrs=(), points=(), decay_mode: str = "torch") -> list[tuple[float, float]]:
    """The distinct (lr, wd) of a sweep, sorted: the lr x wd grid, each ELR line at every lr (wd = elr/lr;
    wd = elr in independent decay mode, where the decay per step is wd) and the explicit points, keyed to
    12 significant digits (elr/lr lands in the last bits of a grid's wd)."""
    line_wd = (lambda elr, lr: elr) if decay_mode == "independent" else (lambda elr, lr: elr / lr)
    pairs = [(lr, wd) for lr in lrs for wd in wds] + [(lr, line_wd(elr, lr)) for elr in elrs for lr in lrs]
    pairs += [(float(lr), float(wd)) for lr, wd in points]
    return sorted({(float(f"{lr:.12g}"), float(f"{wd:.12g}")) for lr, wd in pairs})


# ------------------------------------------------------------ gradient noise


@dataclass(frozen=True)
class GNSConfig:
    """How (and whether) the trainer measures the gradient noise scale (trajinv.gns)."""

    mode: Literal["off", "per-example", "micro-batch"] = "off"
    """off (no probes, no cost), per-example (B_small = 1) or micro-batch (B_small = micro-batch
    size; needs >= 2 micro-batches per step). Both cover every linear weight (output head
    included) and norm gain; the token embedding only with `embeddings`."""

    precond_warmup: int = 10
    """Steps (0-based index < precond_warmup) that use W = 1 before switching to
    the Adam preconditioner 1/(sqrt(v_hat)+eps); at least 1, since before the
    first update there is no second-moment state."""

    ema: float = 0.95
    """EMA decay in [0, 1) applied separately to the numerator and the denominator
    of each noise scale (Adam-style debiased); 0 means no smoothing."""

    every: int = 1
    """Measure on every N-th step only (others train with no probes and no extra
    passes): amortises the cost; the EMAs then average the measured steps."""

    embeddings: bool = False
    """micro-batch mode only: also measure the token embedding (per-example mode cannot).
    Rows of rare tokens have tiny v_hat, so W = 1/(sqrt(v_hat)+eps) is huge there; when
    included, W of the embedding is formed with v_hat floored at the member's mean v_hat
    over the embedding (trajinv.gns.meter). Off: both modes measure the same tensors."""

    def __post_init__(self) -> None:
        _check_choices(self)
        if isinstance(self.precond_warmup, bool) or not isinstance(self.precond_warmup, int):
            raise TypeError(f"GNSConfig.precond_warmup (--gns-warmup) must be an int, got {self.precond_warmup!r}")
        if self.precond_warmup < 1:
            raise ValueError(f"GNSConfig.precond_warmup (--gns-warmup) must be >= 1, got {self.precond_warmup}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"GNSConfig.every (--gns-every) must be an int >= 1, got {self.every!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)):
            raise TypeError(f"GNSConfig.ema must be a float, got {self.ema!r}")
        if not 0.0 <= float(self.ema) < 1.0:
            raise ValueError(f"GNSConfig.ema must be in [0, 1), got {self.ema}")
        if self.embeddings and self.mode == "per-example":
            raise ValueError("GNSConfig.embeddings=True needs mode 'micro-batch': per-example mode "
                             "cannot measure the embedding")

    @property
    def enabled(self) -> bool:
        """True unless mode is "off" (then build no tracker and no probes)."""
        return self.mode != "off"


# ------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are split and cached (trajinv.data)."""

    source: str = "stdlib"
    """'stdlib' (embedded, offline), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG]
    (a hub dataset's train split; from the local Hugging Face cache when the hub is unreachable)."""

    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hub datasets (text files are always ``text``)."""

    tokenizer: str = "bytes"
    """'bytes' (UTF-8 bytes, vocabulary 256) or a path to a tokenizers JSON file."""

    cache_dir: str = ".cache/trajinv"
    """Where token memmaps and manifests live. If left at the default and the
    environment variable ``TRAJINV_CACHE`` is set, that is used instead."""

    val_fraction: float = 0.05
    """Share of tokens held out for validation, chosen as whole documents by a
    fixed (seed-independent) shuffle; tail tokens if there are too few documents."""

    seed: int = 0
    """Validated, then used by nothing: `TrainConfig.seed` seeds the init and the batches (``sample_batch``),
    and the split has its own fixed seed. Kept because the specs that sweeps and tunes store record it (the
    CLI sets both from --seed); a field dropped would make their reruns "another spec"."""

    max_tokens: int | None = None
    """Use only the corpus's first N tokens (train + val, documents in order; none: all of it): a quick run,
    or a small corpus that training comes round to again, where weight decay matters more."""


# ------------------------------------------------------------------ a training run


@dataclass(frozen=True)
class TrainConfig:
    """One population run: K members sharing model, data order and batch sizes."""

    model: ModelConfig = field(default_factory=lambda: PRESETS[DEFAULT_PRESET])
    """Architecture."""
    members: tuple[Member, ...] = (Member(),)
    """The population; K = len(members); K = 1 is an ordinary run."""
    steps: int = 800
    """Optimizer steps per run (with `tokens` set: derived from the token budget instead)."""
    tokens: int | None = None
    """Token budget (sequences x context over all steps), an alternative to --steps: when set, the
    steps are derived from it through the batch-size plan (trajinv.schedules) and replace `steps`.

    The last step may pass the budget by less than one batch; `steps` given with it is ignored
    (the CLI refuses --steps and --tokens that disagree)."""
    batch_size: str = "32"
    """Sequences per step, or a schedule like '32@0.1,256' (32 for the first 10% of the run's tokens,
    then 256)."""
    micro_batch: int = 0
    """Largest micro-batch per forward/backward (gradient accumulation); 0 = whole batch."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end)."""
    eval_seqs: int = 512
    """Validation sequences (a fixed set); 512 windows at context 64 measured a standard error
    of the mean loss of ~0.02 nat, against 0.09 for 16 (trajinv.data)."""
    eval_boot: int = 64
    """Bootstrap resamples of the validation windows behind each eval's val_loss_boot and val_loss_se
    (0: none). The same resamples for every member and step, so analysis resamples spreads jointly."""
    log_every: int = 10
    """Write a metrics line every N steps (and at every eval)."""
    checkpoint_every: int = 200
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept in a run directory (the newest N): a damaged newest one falls back
    to the one before. May change between a run and its resume."""
    seed: int = 0
    """Seeds initialisation and batch order (shared by all members)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device to train on."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16 = autocast; weights and optimizer state stay fp32."""
    gns: GNSConfig = field(default_factory=GNSConfig)
    """Gradient-noise-scale measurement (off by default: then it costs nothing)."""
    kernels: Backend = "auto"
    """Optimizer and GNS kernel backend: auto (Triton on CUDA, the CPU paths on CPU), triton
    (forced; on CPU only under TRITON_INTERPRET=1) or cpu ('torch' is an old alias)."""

    def __post_init__(self) -> None:
        if self.kernels in BACKEND_ALIASES:
            object.__setattr__(self, "kernels", BACKEND_ALIASES[self.kernels])
        if self.tokens is not None:
            # The budget decides: re-derived on every construction, so replace() with another
            # batch size or context keeps steps consistent with the tokens.
            object.__setattr__(self, "steps", self.batch_plan().steps)

    def batch_plan(self) -> BatchPlan:
        """The run's `trajinv.schedules.BatchPlan`: steps per batch-size stage, from `tokens` if
        set, else from `steps`; a one-line ValueError when the schedule cannot fit them."""
        from trajinv.schedules import BatchSchedule  # schedules imports this module

        schedule = BatchSchedule.parse(self.batch_size)
        if self.tokens is not None:
            return schedule.plan_for_tokens(self.tokens, self.model.context)
        return schedule.plan_for_steps(self.steps, self.model.context)

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant (printed, never refused)."""
        try:
            steps = sum(self.batch_plan().counts)
        except ValueError:
            return []  # validate() names that
        out = []
        warmup = self.schedule.warmup
        if warmup >= steps:  # the multiplier is (step+1)/warmup: 1 at step warmup-1 at the earliest
            out.append(f"--warmup {warmup} >= the run's {steps} steps: the whole run is warmup, the lr reaches its "
                       "peak on the last step at most (members train at a fraction of their lr); pass a shorter "
                       "--warmup")
        elif self.schedule.kind == "wsd" and self.schedule.decay_fraction > 0:
            decay = self.schedule.decay_steps(steps)
            if decay and warmup > steps - decay:  # lr_multiplier: the warmup wins over the decay's first steps
                out.append(f"--warmup {warmup} runs into the WSD decay (its last {decay} of {steps} steps): the "
                           f"decay keeps only {steps - warmup} step(s); pass a shorter --warmup or --decay-fraction")
        if self.gns.mode == "off" and self.gns.embeddings:
            out.append("--gns-embeddings has no effect with --gns off (nothing is measured)")
        # measured steps are the multiples of gns.every (GNSMeter.measures); none past the warm-up: W = 1 throughout
        first_preconditioned = -(-self.gns.precond_warmup // self.gns.every) * self.gns.every
        if self.gns.mode != "off" and first_preconditioned >= steps:
            why = (f"the run's {steps} steps" if self.gns.every == 1 else
                   f"every step the run measures (--gns-every {self.gns.every} in {steps} steps)")
            out.append(f"--gns-warmup {self.gns.precond_warmup} covers {why}: W stays the identity, so B_precond is "
                       "B_simple throughout; pass a shorter --gns-warmup")
        return out

    def validate(self) -> None:
        self.model.validate()
        self.optim.validate()
        self.schedule.validate()
        _check_choices(self)
        if not self.members:
            raise ValueError("a population needs at least one member")
        for m in self.members:
            if self.optim.peak_decay(m) >= 1:
                what = "wd" if self.optim.decay_mode == "independent" else "lr*wd"
                raise ValueError(f"member {m.name}: {what} = {self.optim.peak_decay(m):g} >= 1, so weight decay would "
                                 "zero or flip the weights every step; lower lr or wd")
        for name in ("steps", "eval_every", "eval_seqs", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch", "checkpoint_every"):  # one at a time: the message names the bad one
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.eval_boot < 0 or self.eval_boot == 1:
            raise ValueError(f"eval_boot must be 0 or >= 2, got {self.eval_boot}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            # torch's generators take 64 bits: a larger seed failed as "Overflow when unpacking long long"
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        self.batch_plan()  # the schedule parses and fits the run's length


RESUME_NEUTRAL = frozenset({"keep_checkpoints", "checkpoint_every"})
"""TrainConfig fields that do not change what a run computes: a resume (or a sweep rerun) may
change them, and configurations stored before they existed still match. (A resume from any
checkpoint is bit-identical to the run it continues, so where they fall changes nothing.)"""


def same_run(a: dict, b: dict) -> bool:
    """Whether two `to_dict(TrainConfig)` views describe the same run (RESUME_NEUTRAL aside)."""
    # as a spec's `train` entry: one place says which fields a resume may change
    return isinstance(a, dict) and isinstance(b, dict) and not spec_differences({"train": a}, {"train": b})


_ABSENT = object()


def spec_differences(theirs: Any, mine: Any, name: str = "") -> list[str]:
    """Where two JSON views of a spec differ, as 'dotted.name (theirs there, mine here)', RESUME_NEUTRAL
    fields of a `train` config aside: what a refusal to resume names."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        neutral = RESUME_NEUTRAL if name == "train" or name.endswith(".train") else frozenset()
        return [d for k in sorted(set(theirs) | set(mine), key=str) if k not in neutral
                for d in spec_differences(theirs.get(k, _ABSENT), mine.get(k, _ABSENT), f"{name}.{k}" if name else k)]
    if theirs == mine:
        return []

    def show(v: Any) -> str:
        text = "absent" if v is _ABSENT else json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{name or 'the spec'} ({show(theirs)} there, {show(mine)} here)"]


def elr_columns(cfg: TrainConfig, member: Member) -> dict:
    """A summary row's elr (the decay per step at the peak lr: `OptimConfig.peak_decay`), tau_iter = 1/elr
    (None without decay) and tau_fraction = tau_iter / steps."""
    elr = cfg.optim.peak_decay(member)
    t = 1.0 / elr if elr > 0 else None
    return {"elr": elr, "tau_iter": t, "tau_fraction": None if t is None else t / cfg.steps}


def describe_differences(theirs: Any, mine: Any, most: int = 3) -> str:
    """The first `most` of `spec_differences`, joined for one line; "" when the specs agree."""
    diffs = spec_differences(theirs, mine)
    more = f" and {len(diffs) - most} more" if len(diffs) > most else ""
    return "; ".join(diffs[:most]) + more


def to_dict(obj: Any) -> Any:
    """A JSON-ready view of a (nested) config dataclass."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
