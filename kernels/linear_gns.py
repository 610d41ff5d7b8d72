"""Linear-layer weight gradient fused with per-example (preconditioned) squared norms.

For a linear layer y = x @ w.T with input A (n, t, in) and output gradient
Gy (n, t, out), example n contributes C_n = Gy_n^T A_n to the weight gradient
dW = sum_n C_n. The gradient-noise-scale estimator (docs/design.md, "The
gradient noise scale") needs, besides dW,

    S_W = sum_n |C_n|_W^2 = sum_n sum_ij W_ij C_n[i, j]^2     (W > 0, shaped like w)
    S_1 = sum_n |C_n|^2                                          (W = 1)

Memory traffic. Materialising the per-example gradients costs an
(n, out, in) tensor: n * out * in * 4 bytes written and read back, which for
n = 16 and a 4096 x 4096 layer is 1 GiB. The kernel below never writes it: each
program owns one (out, in) tile of dW, loops over the examples, forms the
example's tile C_n with `tl.dot` over that example's t tokens (the same
products the plain weight-gradient GEMM computes, just grouped by example),
adds it into the fp32 dW accumulator in registers, and folds
`sum(W_tile * C_n^2)` and `sum(C_n^2)` into two scalars. Compared with the
plain GEMM it reads W once (out * in elements) and writes two scalars per
(program, example); the extra arithmetic is ~5 flops per (example, element)
against 2 t for the GEMM, i.e. about 5 / (2 t) relative.

Member axis: all tensors carry a leading member dimension K (A (K, n, t, in),
Gy (K, n, t, out), W (K, out, in)); K = 1 is an ordinary run.

Per-program partial sums are written to a (K, n, P) buffer and summed on the
host (P = number of tiles): deterministic, no atomics, and tiny.

Program order. Each program streams its gy column strip and its A column strip
over all of its examples' tokens, so what decides the DRAM traffic is which
programs run at the same time and share strips in L2. The grid's axis 0, which
CUDA launches first, holds dW's tiles in groups of GROUP_I (8) input tiles; axis 1
the (member, split). A wave of programs then covers 8 input tiles by many output
tiles of one member, so each gy strip comes from DRAM about once per group,
tiles_in / 8 times in all (A's 8 strips of a group are shared within each wave;
whether they also stay in L2 across waves depends on the strips' length). In the earlier
order (members, then output tiles, then input tiles) gy came from DRAM once per
input tile: for an LM head of 16k tokens x 128k vocab in bf16 at d = 4096 that is
64 x 4.2 GB, against 8 x 4.2 GB grouped (the grouped order of Triton's matmul
tutorial). Unmeasured on a GPU here; the interpreter checks that every tile is
visited once, the AOT test that no variant spills.

Filling the GPU. A (d=256) layer has only 16 (64 x 64) tiles per member, so
each member's examples may be split over several programs (`choose_splits`):
each split writes its own fp32 dW slab and the slabs are summed afterwards.
Norms are per example, so splitting never touches them; the slab traffic is
kept under ~25% of the operand bytes and is counted by the bench.

Operand precision. bf16/fp16 operands go to `tl.dot` as they are (fp32
accumulation) on the GPU; fp32 operands use tf32 or full fp32 as torch's own fp32 matmuls
are set to (`tf32_allowed`: either of torch's switches). Operands reach shared memory by 16-byte
copies, except for tf32: tf32 MMAs take only K-major (here token-major) operands, and
activations lie with features contiguous, so ptxas copies the transposed operands 4 bytes
at a time (both on sm_90, the gy tile on sm_80; the AOT test pins this). Unmeasured on a
GPU; torch leaves tf32 off by default, which gives full-fp32 dots with 16-byte copies.
The CPU interpreter has no bf16
arithmetic, so there the operands are cast to fp32 after loading (exact:
bf16 -> fp32 is lossless), which the tests use.

CPU path. The tiles are formed by one batched matmul (same GEMM flops) into a
reused scratch buffer and reduced in one native pass (dW, S_1, S_W read each tile
element once); they do reach memory there, bounded by a chunk budget. At the
CPU presets' sizes this costs the tiny preset's layers ~1.3-1.7x the plain dW
GEMM per call, most of it the reduction pass and per-call overhead.

Public API: `linear_weight_grad_with_norms` (Triton on CUDA, the CPU path
otherwise; `out_sums=` adds the sums into a caller's buffer, as the autograd
op does) and `linear_weight_grad_with_norms_reference` (the obvious
per-example einsum, for tests).
"""

from __future__ import annotations

import ctypes
import os

import torch
import triton
import triton.language as tl

from trajinv.kernels.backend import (FLOAT_DTYPES, check_splits, example_ranges, multiprocessors, on_device,
                                     resolve_backend)
from trajinv.kernels.native import NativeLibrary

# CPU path: per-example tiles are formed this many bytes at a time (fp32), so
# memory stays bounded whatever n is, while batches stay big enough for BLAS.
# Measured on the small preset (2-core EPYC): 16 MiB gave 1.07-1.08x step time
# with per-example GNS against 1.12-1.14x at 4 MiB (fewer, larger bmm calls).
_CPU_CHUNK_BYTES = 16 * 2**20

# The CPU path reduces the per-example tiles in one native pass (csrc/linear_gns.cpp): dW,
# S_1 and S_W read each tile element once, where torch ops take four passes (a GEMV, an
# in-place square, a sum and a GEMV), which at t = 64 cost about as much as forming the tiles.
_TILE_BLOCK = 1024  # elements of a tile row per work item
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
NATIVE = NativeLibrary("trajinv_tile_reduce", "linear_gns.cpp",
                       {"trajinv_tile_reduce": ([_P, _P, _I64, _I64, _I64, _P, _P, _P, _INT, _INT, _INT, _INT], _INT)},
                       switch="TRAJINV_NATIVE_GNS", what="native CPU per-example reduction",
                       defines={"BLOCK": _TILE_BLOCK})


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A reused fp32 buffer for the tiles (at most _CPU_CHUNK_BYTES): a fresh multi-MB
    allocation per call costs page faults on first touch, a visible share at t = 64."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def _reduce_tiles(tiles: torch.Tensor, w: torch.Tensor | None, dw: torch.Tensor, s_w: torch.Tensor,
                  s_1: torch.Tensor, accumulate: bool, per_example: bool, add_totals: bool = False) -> None:
    """dw (+)= sum_n tiles[k, n]; s_1 = sum_m tiles^2; s_w = sum_m w tiles^2, for tiles (K, N, M) fp32.

    Sums per example (K, N), or per member (K,) when not `per_example` (then added into
    s_w, s_1 when `add_totals`); s_w = s_1 when `w` is None.
    One native pass when the library is available, else torch ops (which square `tiles` in place
    and sum the squares in fp64).
    Every output is a contiguous fp32 tensor the caller owns; `w` (K, M) fp32 contiguous or None.
    """
    K, N, M = tiles.shape
    lib = NATIVE.get()
    if lib is not None and tiles.is_cpu:
        lib.trajinv_tile_reduce(tiles.data_ptr(), None if w is None else w.data_ptr(), K, N, M, dw.data_ptr(),
                                s_1.data_ptr(), s_w.data_ptr(), int(accumulate), int(per_example),
                                int(add_totals and not per_example), torch.get_num_threads())
        return
    ones = torch.ones(K, 1, N, dtype=torch.float32, device=tiles.device)
    if accumulate:
        dw.view(K, 1, M).baddbmm_(ones, tiles)
    else:
        torch.bmm(ones, tiles, out=dw.view(K, 1, M))
    # S_1 and S_W are sums over out*in elements (millions): accumulated in fp64, as the native
    # pass does across its blocks, not as one fp32 GEMV (relative error ~2e-4 at 512 x 2048).
    sq = tiles.square_()
    e1 = sq.sum(-1, dtype=torch.float64)
    ew = e1 if w is None else torch.bmm(sq.double(), w.double().view(K, M, 1)).view(K, N)
    if add_totals and not per_example:
        s_1.view(-1).add_(e1.sum(1))
        s_w.view(-1).add_(ew.sum(1))
        return
    s_1.view(-1).copy_((e1 if per_example else e1.sum(1)).view(-1))
    s_w.view(-1).copy_((ew if per_example else ew.sum(1)).view(-1))


@triton.jit
def _linear_gns_kernel(
    a_ptr,  # (K, N, T, IN) activations, contiguous
    gy_ptr,  # (K, N, T, OUT) output gradients, contiguous
    w_ptr,  # (K, OUT, IN) positive preconditioner (unused when HAS_W is False)
    dw_ptr,  # (SPLITS, K, OUT, IN) fp32 weight gradient, one slab per example split (written)
    sw_ptr,  # (K, N, P) fp32 per-program partial sum_ij W C_n^2 (written)
    s1_ptr,  # (K, N, P) fp32 per-program partial sum_ij C_n^2 (written)
    N,
    T,
    OUT,
    IN,
    SPLITS,  # example ranges per member, each its own program (fills the GPU when K * tiles is small)
    N_PER,  # examples per split
    TILES_O,  # cdiv(OUT, BLOCK_O)
    TILES_I,  # cdiv(IN, BLOCK_I); the grid's axis 0 is TILES_O * TILES_I
    HAS_W: tl.constexpr,
    UPCAST: tl.constexpr,  # cast operands to fp32 before tl.dot (fp32 inputs, or the interpreter)
    PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP_I: tl.constexpr,  # input tiles of one group of the program order (module doc, "Program order")
):
    # tiles on axis 0 (launched first), (member, split) on axis 1; the tiles in groups of GROUP_I input tiles
    t = tl.program_id(0)  # this program's tile slot, where its partial sums go
    n_tiles = tl.num_programs(0)
    k = tl.program_id(1) // SPLITS
    split = tl.program_id(1) % SPLITS
    per_group = GROUP_I * TILES_O
    first_i = (t // per_group) * GROUP_I
    group_i = tl.minimum(TILES_I - first_i, GROUP_I)
    pid_o = (t % per_group) // group_i
    pid_i = first_i + (t % per_group) % group_i

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    mask_oi = mask_o[:, None] & mask_i[None, :]

    k64 = k.to(tl.int64)
    # 64-bit: one member's weight may hold 2^31 elements or more (a 256k vocabulary at d = 8192)
    w_off = k64 * OUT * IN + offs_o[:, None].to(tl.int64) * IN + offs_i[None, :]
    if HAS_W:
        # W is constant across examples: one read per program.
        w_tile = tl.load(w_ptr + w_off, mask=mask_oi, other=0.0).to(tl.float32)

    dw = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    n_end = tl.minimum(N, (split + 1) * N_PER)
    for n in range(split * N_PER, n_end):
        row0 = (k64 * N + n) * T  # first token row of example n in member k
        c = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + offs_t
            mask_t = rows < T
            gy = tl.load(
                gy_ptr + (row0 + rows)[:, None] * OUT + offs_o[None, :],
                mask=mask_t[:, None] & mask_o[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + (row0 + rows)[:, None] * IN + offs_i[None, :],
                mask=mask_t[:, None] & mask_i[None, :],
                other=0.0,
            )
            if UPCAST:
                c = tl.dot(tl.trans(gy.to(tl.float32)), a.to(tl.float32), c, input_precision=PRECISION)
            else:
                c = tl.dot(tl.trans(gy), a, c)
        dw += c
        c2 = c * c
        part = (k64 * N + n) * n_tiles + t
        tl.store(s1_ptr + part, tl.sum(tl.sum(c2, axis=1), axis=0))
        if HAS_W:
            tl.store(sw_ptr + part, tl.sum(tl.sum(w_tile * c2, axis=1), axis=0))
    tl.store(dw_ptr + split.to(tl.int64) * (tl.num_programs(1) // SPLITS) * OUT * IN + w_off, dw, mask=mask_oi)


def _check(a: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None) -> None:
    if a.dim() != 4 or gy.dim() != 4:
        raise ValueError(f"a and gy must be (K, n, t, d); got a {tuple(a.shape)}, gy {tuple(gy.shape)}")
    if a.shape[:3] != gy.shape[:3]:
        raise ValueError(f"a {tuple(a.shape)} and gy {tuple(gy.shape)} disagree on (K, n, t)")
    for name, x in (("a", a), ("gy", gy), ("precond", precond)):
        if x is not None and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")
    if precond is not None:
        want = (a.shape[0], gy.shape[3], a.shape[3])
        if tuple(precond.shape) != want:
            raise ValueError(f"precond must have shape {want} (K, out, in), got {tuple(precond.shape)}")
    if a.device != gy.device or (precond is not None and precond.device != a.device):
        raise ValueError(f"a, gy, precond must share a device; got {a.device}, {gy.device}")


def linear_weight_grad_with_norms_reference(
    a: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None = None, per_example: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The obvious maths, materialising every C_n = Gy_n^T A_n (fp32). For tests."""
    _check(a, gy, precond)
    c = torch.einsum("kntO,kntI->knOI", gy.float(), a.float())
    c2 = c.square()
    s_1 = c2.sum((2, 3))
    s_w = s_1.clone() if precond is None else (c2 * precond.float()[:, None]).sum((2, 3))
    if not per_example:
        s_w, s_1 = s_w.sum(1), s_1.sum(1)
    return c.sum(1), s_w, s_1


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _cpu_path(
    a: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None, per_example: bool,
    out_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Batched matmul forming the tiles C_n = Gy_n^T A_n (the same GEMM flops as
    # the plain weight gradient), then one pass over them (`_reduce_tiles`)
    # while they are still in cache, writing dW in the weight's own (out, in)
    # layout: no transposed copies of W or dW. On CPU the per-call overhead is
    # what dominates layers this small, so the path is kept to two calls when
    # every member's tiles fit the budget (the CPU presets), else chunked.
    K, N, T, d_in = a.shape
    d_out = gy.shape[3]
    M = d_out * d_in
    if N * T == 0 or M == 0:
        z = torch.zeros(K, N if per_example else 1, dtype=torch.float32, device=a.device)
        z = z if per_example else z.view(K)
        dw = torch.zeros(K, d_out, d_in, dtype=torch.float32, device=a.device)
        return (dw, z, z.clone()) if out_sums is None else (dw, out_sums[0], out_sums[1])
    dw = torch.empty(K, d_out, d_in, dtype=torch.float32, device=a.device)
    w = None if precond is None else _f32(precond)
    w = None if w is None else (w if w.is_contiguous() else w.contiguous()).view(K, M)
    a, gy = _f32(a), _f32(gy)
    if K * N * M * 4 <= _CPU_CHUNK_BYTES:
        tiles = _scratch(K * N * M, a.device).view(K, N, M)
        torch.bmm(gy.reshape(K * N, T, d_out).transpose(1, 2), a.reshape(K * N, T, d_in),
                  out=tiles.view(K * N, d_out, d_in))
        if out_sums is not None:  # straight into the caller's sums
            s_w, s_1 = out_sums[0], out_sums[1]
            _reduce_tiles(tiles, w, dw, s_w, s_1, accumulate=False, per_example=False, add_totals=True)
            return dw, s_w, s_1
        s_w, s_1 = torch.empty(2, K, N if per_example else 1, dtype=torch.float32, device=a.device)
        _reduce_tiles(tiles, w, dw, s_w, s_1, accumulate=False, per_example=per_example)
    else:
        chunk = max(1, min(N, _CPU_CHUNK_BYTES // (4 * M)))
        buf = _scratch(chunk * M, a.device)
        s_w, s_1 = torch.empty(2, K, N if per_example else 1, dtype=torch.float32, device=a.device)
        e_w, e_1 = (s_w, s_1) if per_example else torch.empty(2, K, N, dtype=torch.float32, device=a.device)
        for k in range(K):
            # a[k, n0:n1] and gy[k, n0:n1]^T are views bmm takes without a copy
            for n0 in range(0, N, chunk):
                n1 = min(N, n0 + chunk)
                tiles = buf[: (n1 - n0) * M].view(n1 - n0, d_out, d_in)  # reused: no page faults per chunk
                torch.bmm(gy[k, n0:n1].transpose(1, 2), a[k, n0:n1], out=tiles)
                _reduce_tiles(tiles.view(1, n1 - n0, M), None if w is None else w[k : k + 1], dw[k].view(1, M),
                              e_w[k : k + 1, n0:n1], e_1[k : k + 1, n0:n1], accumulate=n0 > 0, per_example=True)
        if not per_example:
            torch.sum(e_w, 1, keepdim=True, out=s_w)
            torch.sum(e_1, 1, keepdim=True, out=s_1)
    if not per_example:
        s_w, s_1 = s_w.view(K), s_1.view(K)
    return (dw, s_w, s_1) if out_sums is None else (dw, *_add_into(out_sums, s_w, s_1))


def launch_config(upcast: bool, precision: str) -> dict[str, int]:
    """Largest tiles the launcher uses, per operand path, and the warp count.

    Chosen so that every variant compiles for sm_80 and sm_90 without register
    spills (tests/kernels/test_linear_gns.py compiles exactly these): full-fp32 ("ieee")
    dots run on CUDA cores and need a shorter token chunk.
    """
    block_t = 16 if (upcast and precision == "ieee") else 32
    return {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": block_t, "GROUP_I": 8, "num_warps": 8}


def _blocks(d: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(d, 1))))


def choose_splits(programs: int, n: int, t: int, sms: int, d_out: int, d_in: int, elem_bytes: int) -> int:
    """Example splits per member: up to ~2 programs per SM, within a traffic budget.

    A (d=256) layer has only 16 tiles per member, far too few programs for a
    GPU, so each member's examples can be split over programs. Each split then
    writes and reads back one fp32 dW slab (8 * out * in bytes); a split must
    reduce over enough tokens that this stays under ~25% of the operand bytes
    it reads (tokens * (out + in) * elem_bytes).
    """
    want = max(1, (2 * sms) // max(programs, 1))
    min_tokens = -(-32 * d_out * d_in // max(1, elem_bytes * (d_out + d_in)))
    most = max(1, (n * t) // max(1, min_tokens))
    return example_ranges(n, min(want, most))[0]


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use tf32, by whichever switch the caller used: the newer
    `torch.backends[.cuda.matmul].fp32_precision` (reading the legacy `allow_tf32` after setting it
    raises: torch 2.13 does) or the legacy `allow_tf32` / `set_float32_matmul_precision`."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # "none": not set either way, the legacy flag rules
    return precision == "tf32" if precision not in (None, "none") else bool(matmul.allow_tf32)


def _triton_path(
    a: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None, per_example: bool, splits: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K, N, T, d_in = a.shape
    d_out = gy.shape[3]
    a = a.contiguous()
    gy = gy.contiguous()
    dw = torch.empty(K, d_out, d_in, dtype=torch.float32, device=a.device)
    if K * d_out * d_in == 0 or N == 0:
        s = torch.zeros(K, N, dtype=torch.float32, device=a.device)
        return dw.zero_(), (s if per_example else s.sum(1)), (s.clone() if per_example else s.sum(1))
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    low = a.dtype != torch.float32 and a.dtype == gy.dtype
    upcast = interpret or not low
    precision = "tf32" if not interpret and tf32_allowed() else "ieee"
    cfg = launch_config(upcast, precision)
    block_o, block_i = _blocks(d_out, cfg["BLOCK_O"]), _blocks(d_in, cfg["BLOCK_I"])
    block_t = _blocks(T, cfg["BLOCK_T"])
    tiles_o, tiles_i = triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i)
    n_tiles = tiles_o * tiles_i
    if splits is None:
        splits = choose_splits(K * n_tiles, N, T, multiprocessors(a), d_out, d_in, a.element_size())
    splits, n_per = example_ranges(N, splits)
    grid = (n_tiles, K * splits)  # CUDA caps axis 1 at 65535: K * splits is far below it (splits <= ~2 per SM)
    # Split partial dW slabs are summed below: extra traffic 2 * splits * K * out * in * 4 bytes (each written, read).
    dw = dw if splits == 1 else torch.empty(splits, K, d_out, d_in, dtype=torch.float32, device=a.device)
    s_w = torch.empty(K, N, n_tiles, dtype=torch.float32, device=a.device)
    s_1 = torch.empty(K, N, n_tiles, dtype=torch.float32, device=a.device)
    w = None if precond is None else precond.contiguous()
    with on_device(a):
        _linear_gns_kernel[grid](
            a,
            gy,
            w if w is not None else dw,  # dummy pointer, never read when HAS_W is False
            dw,
            s_w,
            s_1,
            N,
            T,
            d_out,
            d_in,
            splits,
            n_per,
            tiles_o,
            tiles_i,
            HAS_W=w is not None,
            UPCAST=upcast,
            PRECISION=precision,
            BLOCK_O=block_o,
            BLOCK_I=block_i,
            BLOCK_T=block_t,
            GROUP_I=cfg["GROUP_I"],
            num_warps=cfg["num_warps"],
        )
    if splits > 1:
        dw = dw.sum(0)
    s_1 = s_1.sum(2)
    s_w = s_1.clone() if w is None else s_w.sum(2)
    if not per_example:
        s_w, s_1 = s_w.sum(1), s_1.sum(1)
    return dw, s_w, s_1


def linear_weight_grad_with_norms(
    a: torch.Tensor,
    gy: torch.Tensor,
    precond: torch.Tensor | None = None,
    per_example: bool = False,
    backend: str = "auto",
    splits: int | None = None,
    out_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight gradient of y = a @ w.T per member, with per-example squared norms.

    Args:
        a: activations (K, n, t, in), fp32/fp16/bf16.
        gy: output gradient (K, n, t, out), same (K, n, t) as `a`.
        precond: positive weights W (K, out, in), or None for W = 1.
        per_example: return the norms per example, (K, n), instead of summed, (K,).
        backend: "auto" (Triton on CUDA, the CPU path otherwise), "triton" or "cpu" (kernels.backend).
        splits: Triton only: split each member's examples into this many ranges,
            one program each, partial dW slabs summed after (None: enough to
            give ~2 programs per SM). Norms are per example, so they do not care.
        out_sums: a (2, K) fp32 buffer to add (S_W, S_1) into in place (not with
            per_example); the returned s_w, s_1 are then its rows. Saves the
            caller an allocation and two adds per layer.

    Returns:
        (dw, s_w, s_1): dw = sum_n Gy_n^T A_n as **fp32** (K, out, in) whatever
        the input dtype (callers cast to the weight's dtype);
        s_w = sum_n |Gy_n^T A_n|_W^2 and s_1 = sum_n |Gy_n^T A_n|^2, fp32,
        shape (K,) or (K, n). No rescaling: with a mean loss over n examples the
        per-example gradient is n * Gy_n^T A_n and the caller applies the n^2.
    """
    _check(a, gy, precond)
    check_splits(splits)
    if out_sums is not None:
        want = (2, a.shape[0])
        if per_example or out_sums.shape != want or out_sums.dtype != torch.float32 \
                or not out_sums.is_contiguous() or out_sums.device != a.device:
            raise ValueError(f"out_sums must be a contiguous fp32 {want} tensor on {a.device} and per_example "
                             f"False; got {tuple(out_sums.shape)} {out_sums.dtype}, per_example={per_example}")
    if resolve_backend(backend, a.device) == "cpu":
        return _cpu_path(a, gy, precond, per_example, out_sums)
    dw, s_w, s_1 = _triton_path(a, gy, precond, per_example, splits)
    return (dw, s_w, s_1) if out_sums is None else (dw, *_add_into(out_sums, s_w, s_1))


def _add_into(out_sums: torch.Tensor, s_w: torch.Tensor, s_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_sums[0] += s_w
    out_sums[1] += s_1
    return out_sums[0], out_sums[1]
