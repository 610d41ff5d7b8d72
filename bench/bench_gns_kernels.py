"""Bench: what the gradient-noise-scale kernels add over the plain gradient work.

For the layers of the tiny (d=64, t=64, n=32) and small (d=256, t=256, n=16)
presets, per kernel:

* **Counted FLOPs and bytes**, fused vs plain, from the launch the launcher
  really makes (its block sizes and grid): every load and store of every
  program, masks included, and every flop of its loop body. "Plain" is the same
  tiling without the norms: the weight-gradient GEMM (reduction over n*t), the
  gain-gradient reduction, or `acc += g`. Bytes are DRAM-compulsory (each
  buffer once; both variants re-read the same operand tiles from L2, so the
  tile re-reads cancel) plus the per-program partial sums and their host-side
  reduction.
* **Measured CPU-path time**, with vs without norms, median of interleaved
  repeats, 1 thread: linear = plain `bmm(Gy^T, A)` vs
  `linear_weight_grad_with_norms` (what the trainer runs); RMSNorm = plain
  einsum gain gradient vs `rmsnorm_gain_grad_with_norms`, and the trainer's
  native norm backward (`rmsnorm_backward_cpu`) as the trainer calls it with GNS off and on (the pass
  forms the per-example norms either way: the difference is the W weighting and the summing);
  accumulate = `acc.add_(g)` vs `accumulate_grad_with_norms`, and every
  parameter of a micro-batch: `torch._foreach_add_` vs the trainer's one-call
  `accumulate_grads_with_norms`.

    .venv/bin/python bench/bench_gns_kernels.py [--quick]

Prints a table and writes bench/results/gns_kernels.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
from results_csv import csv_path, results_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trajinv.kernels import accumulate as ACC  # noqa: E402
from trajinv.kernels import linear_gns as LIN  # noqa: E402
from trajinv.kernels import rmsnorm as RMS  # noqa: E402

MODELS = {"tiny": dict(d=64, t=64, n=32), "small": dict(d=256, t=256, n=16)}
VOCAB = 256  # byte-level data


def _hidden(d: int) -> int:
    return -(-8 * d // 3 // 64) * 64  # ModelConfig.hidden


def layer_linears(d: int) -> dict[str, tuple[int, int]]:
    f = _hidden(d)
    return {"wqkv": (3 * d, d), "wo": (d, d), "w_up": (f, d), "w_down": (d, f), "head": (VOCAB, d)}


# ---------------------------------------------------------------- counting


H100_SMS = 132  # for the launcher's example-split choice (~2 programs per SM)


def linear_counts(K: int, n: int, t: int, d_in: int, d_out: int, act: int, has_w: bool = True) -> dict:
    """Flops and bytes of the fused linear kernel vs the plain weight-gradient GEMM, same tiles.

    The plain GEMM is charged nothing for filling the GPU (cuBLAS would split K
    too); the fused kernel is charged its example-split dW slabs (write + read).
    """
    cfg = LIN.launch_config(upcast=act == 4, precision="tf32" if LIN.tf32_allowed() else "ieee")  # as launched
    bo, bi = LIN._blocks(d_out, cfg["BLOCK_O"]), LIN._blocks(d_in, cfg["BLOCK_I"])
    bt = LIN._blocks(t, cfg["BLOCK_T"])
    tiles_o, tiles_i = math.ceil(d_out / bo), math.ceil(d_in / bi)
    P = tiles_o * tiles_i
    # Tensor-core work: the fused kernel pads each example's t to BLOCK_T; the plain GEMM pads n*t once.
    fused_dot = 2 * K * P * bo * bi * n * math.ceil(t / bt) * bt
    plain_dot = 2 * K * P * bo * bi * math.ceil(n * t / bt) * bt
    useful = 2 * K * n * t * d_out * d_in
    # Per (example, dW element): dW += c; c*c; s1 += ; (W * c2; sw += ) -- over valid lanes.
    elem = (5 if has_w else 3) * K * n * d_out * d_in
    host = 2 * K * n * P  # summing the partials on the host (one add each)
    plain_bytes = K * n * t * (d_in + d_out) * act + 4 * K * d_out * d_in
    parts = (2 if has_w else 1) * K * n * P * 4
    splits = LIN.choose_splits(K * P, n, t, H100_SMS, d_out, d_in, act)
    slabs = 2 * splits * K * d_out * d_in * 4 if splits > 1 else 0  # each split's slab written, read to sum
    extra_bytes = (4 * K * d_out * d_in if has_w else 0) + 2 * parts + 2 * 4 * K * n + slabs  # W, partials, out
    return dict(
        plain_flops=plain_dot if plain_dot else useful,
        extra_flops=fused_dot - plain_dot + elem + host + (splits - 1) * K * d_out * d_in,
        plain_bytes=plain_bytes,
        extra_bytes=extra_bytes,
        note=f"tiles {bo}x{bi}x{bt}, P={P}, H100 example splits {splits}, useful GEMM {useful:.3g} flops",
    )


def rmsnorm_counts(K: int, n: int, t: int, d: int, act: int, has_w: bool = True) -> dict:
    """Fused gain gradient + norms vs the plain gain-gradient reduction, same tiles."""
    bd = RMS.launch_config(d)["BLOCK_D"]
    P = math.ceil(d / bd)
    plain_flops = 3 * K * n * t * d  # x * rstd, * gy, += (per element)
    elem = (5 if has_w else 3) * K * n * d
    plain_bytes = 2 * K * n * t * d * act + 4 * K * n * t + 4 * K * d  # x, gy, rstd; write dg
    parts = (2 if has_w else 1) * K * n * P * 4
    splits = RMS.choose_splits(K * P, n, H100_SMS)  # example ranges, as the launcher splits them
    slabs = 2 * splits * K * d * 4 if splits > 1 else 0  # each range's fp32 dg slab written, read to sum
    extra_bytes = (4 * K * d if has_w else 0) + 2 * parts + 2 * 4 * K * n + slabs
    return dict(plain_flops=plain_flops, extra_flops=elem + 2 * K * n * P + (splits - 1) * K * d,
                plain_bytes=plain_bytes, extra_bytes=extra_bytes,
                note=f"BLOCK_D={bd}, P={P}, H100 example splits {splits}")  # fmt: skip


def accumulate_counts(members: int, numel: int, grad_bytes: int, has_w: bool = True) -> dict:
    """Fused accumulate + norms vs plain acc += g (fp32 accumulator)."""
    m = numel // members
    block = min(ACC.LAUNCH_CONFIG["BLOCK"], max(16, 1 << (m - 1).bit_length()))
    P = members * math.ceil(m / block)
    plain_bytes = numel * (grad_bytes + 4 + 4)  # read g, read acc, write acc
    parts = (2 if has_w else 1) * P * 4
    extra_bytes = (4 * numel if has_w else 0) + 2 * parts + 2 * 4 * members
    return dict(plain_flops=numel, extra_flops=(4 if has_w else 2) * numel + 2 * P, plain_bytes=plain_bytes,
                extra_bytes=extra_bytes, note=f"BLOCK={block}, P={P}")  # fmt: skip


def model_param_sizes(d: int, K: int, n_layers: int) -> list[tuple[int, int]]:
    f = _hidden(d)
    per_block = [d, 3 * d * d, d * d, d, f * d, f * d, d * f]
    return [(K, K * x) for x in [VOCAB * d] + per_block * n_layers + [d, VOCAB * d]]


# ---------------------------------------------------------------- timing


def _interleaved(fns: list, reps: int) -> list[float]:
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] * 1e3 for ts in times]


def time_linear(K, n, t, d_in, d_out, reps):
    a, gy = torch.randn(K, n, t, d_in), torch.randn(K, n, t, d_out)
    w = torch.rand(K, d_out, d_in) + 0.1
    plain = lambda: torch.bmm(gy.reshape(K, n * t, d_out).transpose(1, 2), a.reshape(K, n * t, d_in))  # noqa: E731
    fused = lambda: LIN.linear_weight_grad_with_norms(a, gy, w, backend="cpu")  # noqa: E731
    return _interleaved([plain, fused], reps)


def time_rmsnorm(K, n, t, d, reps):
    x, gy = torch.randn(K, n, t, d), torch.randn(K, n, t, d)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    w = torch.rand(K, d) + 0.1
    # Two ways to get the plain gain gradient; the faster one is the baseline.
    plain_a = lambda: torch.einsum("kntd,kntd->kd", gy, x * rstd[..., None])  # noqa: E731
    plain_b = lambda: torch.einsum("kntd,kntd->knd", gy, x * rstd[..., None]).sum(1)  # noqa: E731
    fused = lambda: RMS.rmsnorm_gain_grad_with_norms(x, rstd, gy, w, backend="cpu")  # noqa: E731
    ta, tb, tf = _interleaved([plain_a, plain_b, fused], reps)
    return min(ta, tb), tf


def time_rmsnorm_native(K, n, t, d, reps):

    x, gy = torch.randn(K, n, t, d), torch.randn(K, n, t, d)
    gain, w, sums = torch.rand(K, d) + 0.5, torch.rand(K, d) + 0.1, torch.zeros(2, K)
    rstd = RMS.rmsnorm_forward_cpu(x, gain, 1e-6)[1]
    plain = lambda: RMS.rmsnorm_backward_cpu(x, rstd, gain, gy)  # noqa: E731
    fused = lambda: RMS.rmsnorm_backward_cpu(x, rstd, gain, gy, w, out_sums=sums)  # noqa: E731
    return _interleaved([plain, fused], reps)


def time_accumulate_list(sizes, reps):
    """Every parameter's micro-batch gradient: foreach add vs the one native call with norms."""
    accs = [torch.zeros(numel) for _, numel in sizes]
    grads = [torch.randn(numel) for _, numel in sizes]
    ws = [torch.rand(numel) + 0.1 for _, numel in sizes]
    K, sums = sizes[0][0], torch.zeros(2, sizes[0][0], dtype=torch.float64)
    accs, grads, ws = ([x.view(K, -1) for x in xs] for xs in (accs, grads, ws))
    plain = lambda: torch._foreach_add_(accs, grads)  # noqa: E731
    fused = lambda: ACC.accumulate_grads_with_norms(accs, grads, ws, K, out_sums=sums)  # noqa: E731
    return _interleaved([plain, fused], reps)


def time_model_step(d: int, t: int, n: int, K: int, reps: int) -> tuple[float, float]:
    """Forward + backward of the GPT preset, probes on every linear and gain vs none."""
    import dataclasses

    from trajinv.config import PRESETS
    from trajinv.ops import Probe
    from trajinv.model import GPT

    name = next(k for k, c in PRESETS.items() if c.d_model == d and c.context == t)
    model = GPT(dataclasses.replace(PRESETS[name], vocab_size=VOCAB), K)
    model.init_weights()
    idx, tgt = torch.randint(0, VOCAB, (n, t)), torch.randint(0, VOCAB, (n, t))
    probes = {nm: Probe(precond=torch.rand_like(p) + 0.1) for nm, p in model.named_parameters() if nm != "wte"}

    def step(on: bool) -> None:
        model.probes.clear()
        if on:
            model.probes.update(probes)
        model.zero_grad(set_to_none=True)
        model(idx, tgt)[1].sum().backward()

    return _interleaved([lambda: step(False), lambda: step(True)], reps)


def time_accumulate(shape, members, reps):
    acc, g = torch.zeros(shape), torch.randn(shape)
    w = torch.rand(shape) + 0.1
    plain = lambda: acc.add_(g)  # noqa: E731
    fused = lambda: ACC.accumulate_grad_with_norms(acc, g, w, members=members, backend="cpu")  # noqa: E731
    return _interleaved([plain, fused], reps)


# ---------------------------------------------------------------- driver


def rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # stable numbers on a shared machine; ratios are what we report
    reps = 5 if quick else 25
    out = []
    for model, s in MODELS.items():
        K, d, t, n = 1, s["d"], s["t"], s["n"]
        for act_name, act in (("fp32", 4), ("bf16", 2)):
            for name, (o, i) in layer_linears(d).items():
                r = dict(model=model, kernel="linear", tensor=name, shape=f"n{n} t{t} {o}x{i}", dtype=act_name)
                r.update(linear_counts(K, n, t, i, o, act))
                if act == 4 and not (quick and name != "wqkv"):
                    r["cpu_plain_ms"], r["cpu_fused_ms"] = time_linear(K, n, t, i, o, reps)
                out.append(r)
            r = dict(model=model, kernel="rmsnorm", tensor="gain", shape=f"n{n} t{t} d{d}", dtype=act_name)
            r.update(rmsnorm_counts(K, n, t, d, act))
            if act == 4:
                r["cpu_plain_ms"], r["cpu_fused_ms"] = time_rmsnorm(K, n, t, d, reps)
            out.append(r)
        r = dict(model=model, kernel="rmsnorm native bwd", tensor="gain", shape=f"n{n} t{t} d{d}", dtype="fp32",
                 note="trainer's CPU norm backward (dx and dgain), GNS off vs on: the native pass forms the "
                      "per-example norms either way, so this is the W weighting and the summing into the trainer's "
                      "buffer")
        r["cpu_plain_ms"], r["cpu_fused_ms"] = time_rmsnorm_native(K, n, t, d, reps)
        out.append(r)
        for name, shp in {"w_up": (1, _hidden(d), d), "wte": (1, VOCAB, d), "K=9 w_up": (9, _hidden(d), d)}.items():
            members = shp[0]
            r = dict(model=model, kernel="accumulate", tensor=name, shape="x".join(map(str, shp)), dtype="fp32")
            r.update(accumulate_counts(members, math.prod(shp), 4))
            r["cpu_plain_ms"], r["cpu_fused_ms"] = time_accumulate(shp, members, reps)
            out.append(r)
        layers = 2 if model == "tiny" else 4
        for K in (1, 9):
            sizes = model_param_sizes(d, K, layers)
            r = dict(model=model, kernel="accumulate list", tensor=f"all params K={K}", dtype="fp32",
                     shape=f"{len(sizes)} tensors", note="foreach add vs one native call with norms (trainer)")
            r["cpu_plain_ms"], r["cpu_fused_ms"] = time_accumulate_list(sizes, reps)
            out.append(r)
    steps = [("tiny", 1), ("tiny", 9)] + ([] if quick else [("small", 1)])
    for model, K in steps:
        s = MODELS[model]
        r = dict(model=model, kernel="model fwd+bwd", tensor=f"K={K}", shape=f"n{s['n']} t{s['t']} d{s['d']}",
                 dtype="fp32", note="all linears and gains probed (embedding not) vs GNS off")  # fmt: skip
        r["cpu_plain_ms"], r["cpu_fused_ms"] = time_model_step(s["d"], s["t"], s["n"], K, 3 if quick else 11)
        out.append(r)
    for r in out:
        if "plain_flops" not in r:
            continue
        r["extra_flops_pct"] = 100 * r["extra_flops"] / r["plain_flops"]
        r["extra_bytes_pct"] = 100 * r["extra_bytes"] / r["plain_bytes"]
    for r in out:
        if "cpu_plain_ms" in r:
            r["cpu_ratio"] = r["cpu_fused_ms"] / r["cpu_plain_ms"]
    return out


COLUMNS = ["model", "kernel", "tensor", "shape", "dtype", "plain_flops", "extra_flops", "extra_flops_pct",
           "plain_bytes", "extra_bytes", "extra_bytes_pct", "cpu_plain_ms", "cpu_fused_ms", "cpu_ratio", "note"]  # fmt: skip


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, int) and v >= 1e5:
        return f"{v:.3e}"
    return "" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, time only one linear per model")
    ap.add_argument("--out", default=None, type=csv_path,
                    help="CSV path (default: gns_kernels.csv in results_csv.results_dir)")
    args = ap.parse_args()
    args.out = args.out or results_dir(args.quick) / "gns_kernels.csv"
    table = rows(args.quick)
    show = [c for c in COLUMNS if c != "note"]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in table)) for c in show}
    print("  ".join(c.rjust(widths[c]) for c in show))
    for r in table:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in show))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    print(f"wrote {args.out}  (CPU times: CPU path, 1 thread, median of interleaved repeats)")


if __name__ == "__main__":
    main()
