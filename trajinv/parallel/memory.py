"""How many members fit on one device: a population's memory, estimated before building it.

A sweep of many members is split into populations (`SweepSpec.population`); this
module picks that size so one population fits the free memory of the device it
trains on, unless the user fixed it (`--population`). The estimate is a count,
not a measurement, so it can run in the parent before any worker or GPU exists:

    state        = P x K x bytes per parameter      (P = parameters per member)
    activations  = K x micro-batch x context x bytes per token (saved for backward)

Bytes per parameter (fp32 weights and optimizer state; `dtype` bf16 is autocast,
so only activations shrink):

| what | bytes | why |
|---|---|---|
| weights | 4 | fp32 (also under bf16 autocast) |
| gradients | 4 | `.grad` of the step |
| Adam m and v | 8 | the fused optimizer's flat fp32 `exp_avg`, `exp_avg_sq` |
| fused-optimizer scratch | 8 | statistics scratch of the CPU torch-ops path, or the Triton path's flat grad buffer + copy-in; counted always, so the estimate is safe for every backend |
| micro-batch accumulation | 8 | the running sum, and the next micro-batch's gradient that autograd materialises before adding it in (only with >= 2 micro-batches) |
| GNS: preconditioner W | 4 | `FusedAdamW.preconditioners()` flat buffer (GNS on) |

Activations per token and member, L layers, width d, SwiGLU width f, H heads,
context t, vocabulary V, in elements (times 4 bytes for fp32, ~2.5 under bf16
autocast, whose fp32 master copies of the weights are transient):

    L x (12 d + 5 f + 2 H t)  +  3 d  +  3 V

(per block: the residual, two norm outputs, q/k/v and their rotated copies, the
attention output, SwiGLU's gate, up, silu and product, the down output, and the
attention probabilities of torch's math path; after the blocks: the final norm,
the logits, their log-softmax and its gradient during backward). Per-example GNS
adds the fp32 weight-gradient scratch of its kernels (up to 16 MiB on CPU, one
(out x in) slab per member on CUDA). Evaluation saves nothing for backward and runs in
chunks no larger than a training forward (`Trainer`, `EVAL_CHUNK`), so its logits stay
below this peak. On the Triton path a population whose K x P passes 2^31 elements gets a
second optimizer bucket (`trajinv.kernels.adamw.FLAT_LIMIT`), not a refusal (one tensor of K
members past it, K x a 50k x 768 embedding at K > 55, is still refused).

`tests/parallel/test_memory.py` checks the state part against the tensors of a
built Trainer and the total against the measured peak RSS growth of CPU training
steps: within a factor 1.5 either way (measured here: 0.87x to 1.3x for the tiny
and small presets, K = 1 to 16, with and without micro-batches and GNS). The
safety share of the free memory (`SAFETY`) absorbs the under-estimates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from trajinv.config import ModelConfig

STATE_BYTES = {"weights": 4, "grads": 4, "adam": 8, "optimizer_scratch": 8}
ACCUMULATE_BYTES = 8
PRECOND_BYTES = 4
PER_EXAMPLE_SCRATCH = 16 << 20
ACT_BYTES = {"fp32": 4.0, "bf16": 2.5}
SAFETY = {"cpu": 0.6, "cuda": 0.85}
"""Share of the free memory a population may plan to use: the estimate is a count, the
allocator fragments, and on CPU the page cache and other processes share the RAM."""


def params_per_member(model: ModelConfig) -> int:
    """Parameters of one member (`trajinv.model.count_params` without building the model)."""
    if model.vocab_size is None:
        raise ValueError("model vocab_size must be set to size a population (take it from the data)")
    d, f, V = model.d_model, model.hidden, model.vocab_size
    block = 2 * d + 4 * d * d + 3 * f * d
    return 2 * V * d + d + model.n_layers * block


def activation_elements_per_token(model: ModelConfig) -> int:
    """Elements saved for backward per token and member (see the module doc)."""
    d, f, V, L = model.d_model, model.hidden, model.vocab_size or 256, model.n_layers
    return L * (12 * d + 5 * f + 2 * model.n_heads * model.context) + 3 * d + 3 * V


def estimate_population_bytes(model: ModelConfig, members: int, batch: int, micro_batch: int = 0,
                              gns_mode: str = "off", dtype: str = "fp32") -> int:
    """Bytes one population of `members` needs on its device at its peak (the backward of a micro-batch).

    `batch` is the largest batch of the schedule, `micro_batch` the largest forward (0: the whole
    batch), `gns_mode` and `dtype` as in `TrainConfig`.
    """
    if members < 1 or batch < 1 or micro_batch < 0:
        raise ValueError(f"members and batch must be >= 1 and micro_batch >= 0, got {members}, {batch}, {micro_batch}")
    if dtype not in ACT_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose {', '.join(ACT_BYTES)}")
    P = params_per_member(model)
    per_param = sum(STATE_BYTES.values())
    micro = min(micro_batch or batch, batch)
    if micro < batch:
        per_param += ACCUMULATE_BYTES
    if gns_mode != "off":
        per_param += PRECOND_BYTES
    state = P * members * per_param
    tokens = micro * model.context
    acts = int(members * tokens * activation_elements_per_token(model) * ACT_BYTES[dtype])
    extra = PER_EXAMPLE_SCRATCH if gns_mode == "per-example" else 0
    return state + acts + extra


def free_bytes(device: str, share: int = 1) -> int:
    """Free memory of `device` ('cpu', 'cuda', 'cuda:N') for one of `share` workers on it.

    CUDA: `torch.cuda.mem_get_info` plus what this process's caching allocator holds unused (call it where
    the training runs: it creates a context).
    CPU: MemAvailable of /proc/meminfo, else psutil's available memory, else free pages (sysconf).
    """
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        # what this process's allocator holds but no tensor uses is free to it too: without it, the
        # stages of a tune after the first were sized from what the earlier ones left cached
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return (int(torch.cuda.mem_get_info(dev)[0]) + int(cached)) // share
    return _available_ram() // share


def _available_ram() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_members(model: ModelConfig, members: int, batch: int, micro_batch: int, gns_mode: str, dtype: str,
                budget: int) -> int:
    """The most members (<= `members`, >= 1) whose estimate fits in `budget` bytes."""
    lo, hi = 1, members
    while lo < hi:  # the estimate grows with the member count
        mid = (lo + hi + 1) // 2
        if estimate_population_bytes(model, mid, batch, micro_batch, gns_mode, dtype) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def size_populations(spec, out: str | Path, free: Callable[[], int], device_kind: str, workers: int = 1):
    """`spec` with the population size that fits the device and feeds every worker: `spec.population`
    when set (the user's `--population`); the size stored in `out`'s spec.json once one of its populations
    has trained (a rerun keeps its populations whatever memory is free now: `trajinv.rundirs.trained_split`);
    else the smaller of the largest size that fits in `free()` bytes times the `device_kind` safety share
    and `spread_size` over `workers` (0, all members at once, when that is every member)."""
    if spec.population:
        return spec
    from trajinv.rundirs import trained_split

    split = trained_split(Path(out))
    if split is not None:
        return replace(spec, population=split)
    from trajinv.data.tokenizer import load_tokenizer
    from trajinv.schedules import BatchSchedule

    cfg = spec.train
    model = replace(cfg.model, vocab_size=cfg.model.vocab_size or load_tokenizer(spec.data.tokenizer).vocab_size)
    batch = max(max(BatchSchedule.parse(b).sizes) for b in spec.batch_sizes)
    n = len(spec.members())
    size = fit_members(model, n, batch, cfg.micro_batch, cfg.gns.mode, cfg.dtype, int(free() * SAFETY[device_kind]))
    size = min(size, spread_size(n, len(spec.batch_sizes), workers))
    return spec if size >= n else replace(spec, population=size)


def spread_size(members: int, batch_sizes: int, workers: int) -> int:
    """The population size that spreads a sweep over `workers` and ends it soonest.

    Every batch size is its own population already; the members of each split into p
    populations, p at most ceil(workers / batch_sizes) (enough for every worker to get one).
    Of those p, the one whose sweep ends soonest, counting a population's time as its size:
    ceil(batch_sizes * p / workers) rounds of ceil(members / p); ties go to fewer, larger
    populations (a member costs less in a wider one: a GPU's matmuls run wider). So 25
    members on 8 GPUs train as seven populations of at most 4, in one round (the eighth GPU
    would take one member off one of them and end no sooner); 6 members at each of 2 batch
    sizes on 3 workers stay 2 populations of 6 (4 of 3 would take two rounds of 3). On CPU a
    member's numbers do not depend on its population (docs/design.md, "Population
    independence")."""
    if min(members, batch_sizes, workers) < 1:
        raise ValueError(f"spread_size needs members, batch sizes and workers >= 1, got {members}, {batch_sizes}, "
                         f"{workers}")
    most = min(-(-workers // batch_sizes), members)
    p = min(range(1, most + 1), key=lambda p: (-(-batch_sizes * p // workers) * -(-members // p), p))
    return -(-members // p)
