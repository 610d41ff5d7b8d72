"""Bench: torch AdamW (for-loop / foreach / fused) against FusedAdamW (CPU path; Triton path on CUDA).

Per provider: max |error| against an fp64 AdamW run on the same grads, step
time (best of N: the least disturbed by other work on a shared machine), bytes moved per parameter, effective GB/s and that as a fraction of
this machine's measured copy bandwidth, and launches (CUDA) or aten ops plus native
kernel calls (CPU) per step.

Bytes are *counted*, not assumed: a TorchDispatchMode records every aten op a
step runs and adds the bytes of the tensors it reads (inputs) and writes
(outputs and arguments its schema marks mutable; view ops move nothing). That
is exact for single-pass ops such as torch's fused AdamW (28 B/param fp32) and
a lower bound for composite ones (an op that reads an input twice counts once).
The Triton kernel is not an aten op; its bytes are counted from the block
table it is launched with (elements x bytes of each buffer it loads/stores,
plus the 16 B of statistics and 32 B of table per block), and any grad
gather copies show up as aten ops. The native CPU kernel (trajinv.kernels.adamw, the
fp32 CPU path of "ours-cpu") is not an aten op either: its bytes are counted
from its segment table (28 B per fp32 param, 16 B of statistics per segment,
its table and pointers); "ours-cpu-torchops" rows are the same optimizer
forced onto the torch-ops path for comparison.

The copy bandwidth is that of ``b.copy_(a)`` over 256 MB or more. On CPU a
copy also pays a read-for-ownership of the destination that in-place updates
(AdamW's p, m, v) do not, so optimizers can exceed 1.0 of it there.

    .venv/bin/python bench/bench_adamw.py [--quick] [--device cpu|cuda] [--threads N]

Writes bench/results/adamw.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
from results_csv import at_least, csv_path, refuse_missing_cuda, results_dir
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trajinv.kernels import adamw as F  # noqa: E402
from trajinv.optim import FusedAdamW  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


_OVERWRITES = {torch.ops.aten.copy_, torch.ops.aten.zero_, torch.ops.aten.fill_, torch.ops.aten._foreach_copy_,
               torch.ops.aten._foreach_zero_}
"""In-place ops that replace their destination without reading it (a copy moves 8 B/elem fp32, not 12)."""


class ByteCounter(TorchDispatchMode):
    """Counts aten ops and the bytes they read and write."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.read = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return func(*args, **kwargs)  # a view: no data moves
        self.ops += 1
        flat_in = []
        overwrite = func.overloadpacket in _OVERWRITES
        for a, v in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
            ts = [v] if isinstance(v, torch.Tensor) else [x for x in v if isinstance(x, torch.Tensor)] if isinstance(v, (list, tuple)) else []
            nbytes = sum(t.numel() * t.element_size() for t in ts)
            written = a.alias_info is not None and a.alias_info.is_write
            if not (overwrite and written):  # a copy's or a fill's destination is written, never read
                self.read += nbytes
            # torch's fused Adam declares grads mutable for the in-place unscale; without a
            # grad_scale it leaves them alone
            unscale = a.name == "grads" and kwargs.get("grad_scale") is None
            if a.alias_info is not None and a.alias_info.is_write and not unscale:
                self.written += nbytes
            flat_in.append(ts)
        out = func(*args, **kwargs)
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if not mutates:
            outs = out if isinstance(out, (list, tuple)) else [out]
            self.written += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        return out


def make_params(n_params: int, n_tensors: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """A transformer-like mix: a few big matrices, many small vectors; about n_params in total."""
    g = torch.Generator().manual_seed(seed)
    big = n_tensors // 3
    sizes = [max(1, (n_params - 64 * (n_tensors - big)) // big)] * big + [64] * (n_tensors - big)
    return [torch.randn(s, generator=g).to(device) for s in sizes]


def make_grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.device) for p in params] for _ in range(steps)]


def providers(device: str):
    out = {
        "torch-forloop": lambda ps: torch.optim.AdamW(ps, foreach=False, **HP),
        "torch-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **HP),
        "torch-fused": lambda ps: torch.optim.AdamW(ps, fused=True, **HP),
    }
    if device == "cpu":
        out["ours-cpu"] = lambda ps: FusedAdamW(ps, backend="cpu", **HP)
        out["ours-cpu-nostats"] = lambda ps: _no_stats(FusedAdamW(ps, backend="cpu", **HP))
        if F.NATIVE.get() is not None:  # the same two without the native kernel: torch ops only
            out["ours-cpu-torchops"] = lambda ps: FusedAdamW(ps, backend="cpu", native_cpu=False, **HP)
            out["ours-cpu-torchops-nostats"] = lambda ps: _no_stats(
                FusedAdamW(ps, backend="cpu", native_cpu=False, **HP))
    else:
        out["ours-triton"] = lambda ps: FusedAdamW(ps, backend="triton", **HP)
    return out


def _no_stats(opt: FusedAdamW) -> FusedAdamW:
    """Every step of this optimizer asks for no statistics (what the bench's loop calls is step())."""
    step = opt.step
    opt.step = lambda *a, **k: step(*a, statistics=False, **k)
    opt.statistics_off = True
    return opt


def native_bytes(opt: FusedAdamW) -> int:
    """Bytes of the native CPU kernel's last step (not an aten op): 28 B per fp32 param
    (read p, g, m, v; write p, m, v), its segment table, pointers and statistics rows."""
    total = 0
    for b in opt._buckets or []:
        if not opt.native_cpu or b.dtype != torch.float32 or not b.native_plans:
            continue
        plan = b.native_plans[tuple(p.grad is not None for p in b.params)]
        n = sum(b.segments[s].hi - b.segments[s].lo for s in plan.segs)
        total += 28 * n + plan.table.numel() * 8 + 16 * len(plan.idx)
        if not getattr(opt, "statistics_off", False):
            total += 16 * len(plan.segs)
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, n: int) -> float:
    """GB/s of a plain device copy (read + write) of n fp32 (at least 256 MB, past the caches)."""
    a = torch.randn(max(n, 1 << 26), device=device)
    b = torch.zeros_like(a)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(times[2:]) / 1e9


def triton_bytes(opt: FusedAdamW) -> int:
    """Bytes the kernel launches of the last step move, from their block tables."""
    total = 0
    for st in opt._step_stats:
        b, blocks = st.bucket, st.blocks
        n = int((blocks[:, F.COL_HI] - blocks[:, F.COL_LO]).sum())
        ps = b.flat_param.element_size()
        if b.master is None:
            per = (2 * ps + 8) + (ps + 8)  # read p, g, m, v; write p, m, v
        else:
            per = (ps + 12) + (ps + 12)  # read g, master, m, v; write p, master, m, v
        total += n * per + blocks.shape[0] * (16 + 32)
    return total


def run_provider(name, make, params0, grads, ref_params, device, timed_steps):
    ps = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = make(ps)
    n = sum(p.numel() for p in ps)
    # correctness: the first len(grads) steps against the fp64 run
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    err = max((p.detach().double() - r).abs().max().item() for p, r in zip(ps, ref_params))
    # bytes and ops of one step, the step the timing below repeats: grads already in place (as after
    # zero_grad(set_to_none=False)). Fresh .grad tensors cost the Triton path a gather into its flat buffer
    # (+8 B/param fp32, trajinv.optim.buckets), which one untimed step here does, counted by nothing.
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    opt.step()
    launches = None
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            sync(device)
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    before = F.LAUNCHES + F.NATIVE_CALLS
    with ByteCounter() as bc:
        opt.step()
    kernel_bytes = triton_bytes(opt) if name.startswith("ours-triton") else native_bytes(opt) if name.startswith("ours-cpu") else 0
    ops = bc.ops + F.LAUNCHES + F.NATIVE_CALLS - before
    nbytes = bc.read + bc.written + kernel_bytes
    times = []
    for i in range(timed_steps + 2):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = min(times[2:])  # best of N: the least disturbed by other work on a shared machine
    return dict(provider=name, params=n, max_err=err, step_ms=t * 1e3, bytes_per_param=nbytes / n,
                gbps=nbytes / t / 1e9, launches=launches if launches is not None else ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, type=csv_path,
                    help="CSV path (default: adamw.csv in results_csv.results_dir)")
    ap.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    args.out = args.out or results_dir(args.quick) / "adamw.csv"
    refuse_missing_cuda(ap, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_params, n_tensors, steps, timed = (1_000_000, 60, 3, 10) if args.quick else (16_000_000, 150, 5, 30)
    if args.device == "cuda":
        n_params *= 8
    params0 = make_params(n_params, n_tensors, args.device)
    grads = make_grads(params0, steps)
    ref = [torch.nn.Parameter(p.double().cpu()) for p in params0]
    ropt = torch.optim.AdamW(ref, foreach=False, **HP)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g.double().cpu()
        ropt.step()
    ref_params = [p.detach().to(args.device) for p in ref]
    bw = copy_bandwidth(args.device, n_params)
    rows = []
    for name, make in providers(args.device).items():
        r = run_provider(name, make, params0, grads, ref_params, args.device, timed)
        r["frac_copy_bw"] = r["gbps"] / bw
        r["device"] = args.device
        rows.append(r)
    fused = next(r for r in rows if r["provider"] == "torch-fused")
    for r in rows:
        r["vs_torch_fused"] = r["step_ms"] / fused["step_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cols = ["provider", "device", "params", "max_err", "step_ms", "vs_torch_fused", "bytes_per_param", "gbps",
            "frac_copy_bw", "launches"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in cols})
    launch_name = "launches/step" if args.device == "cuda" else "ops/step"
    print(f"{n_params:,} params in {n_tensors} tensors on {args.device}; copy bandwidth {bw:.1f} GB/s; "
          f"threads={torch.get_num_threads()}")
    print(f"{'provider':26} {'max err':>9} {'ms/step':>8} {'x fused':>8} {'B/param':>8} {'GB/s':>7} "
          f"{'of copy':>8} {launch_name:>14}")
    for r in rows:
        print(f"{r['provider']:26} {r['max_err']:9.2e} {r['step_ms']:8.2f} {r['vs_torch_fused']:8.2f} "
              f"{r['bytes_per_param']:8.1f} {r['gbps']:7.1f} {r['frac_copy_bw']:8.2f} {r['launches']:>14}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
