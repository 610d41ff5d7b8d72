"""A GPT whose every parameter carries a leading member axis K.

Token embedding, pre-norm blocks (RMSNorm -> causal self-attention with RoPE ->
residual; RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, untied output head,
no biases. K members share one forward/backward of batched matmuls; each member's
loss depends only on its own slice of every parameter, so summing the member
losses and calling backward gives every member exactly its own gradient. K = 1
is an ordinary GPT.

Shapes: tokens (n, t) are shared by all members; activations are (K, n, t, d);
linear weights are (K, out, in); norm gains (K, d); embeddings (K, vocab, d).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trajinv.config import ModelConfig
from trajinv.ops import member_linear, rms_norm


def rope_tables(context: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (context, head_dim) for rotary position embeddings: pair i's angle
    at both of its columns, sin as (-sin, +sin) (the layout `apply_rope` multiplies by)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (..., t, head_dim) by position-dependent angles (`rope_tables`).

    Whole rows against full-width tables, x*cos + (x with each pair swapped)*sin: the same
    products and sums as the pairwise x1*c - x2*s, x1*s + x2*c (negating s or swapping the
    terms of a sum is exact), so the same bits, forward and backward. The pairwise form read x
    at stride 2 and its backward scattered each half into a zero-filled full tensor: on this
    project's 2-core CPU, RoPE alone (tiny, K = 5, a micro-batch of 8: q and k, forward and
    backward) took about 40 % less time this way, a whole micro-batch's forward and backward 2-4 %."""
    t = x.shape[-2]
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos[:t].to(x.dtype) + swapped * sin[:t].to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, members: int, index: int, probes: dict):
        super().__init__()
        K, d, f = members, cfg.d_model, cfg.hidden
        self.cfg, self.index, self.probes = cfg, index, probes
        self.attn_norm = nn.Parameter(torch.ones(K, d))
        self.wqkv = nn.Parameter(torch.empty(K, 3 * d, d))
        self.wo = nn.Parameter(torch.empty(K, d, d))
        self.mlp_norm = nn.Parameter(torch.ones(K, d))
        self.w_gate = nn.Parameter(torch.empty(K, f, d))
        self.w_up = nn.Parameter(torch.empty(K, f, d))
        self.w_down = nn.Parameter(torch.empty(K, d, f))

    def _probe(self, name: str):
        return self.probes.get(f"blocks.{self.index}.{name}")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return member_linear(x, getattr(self, name), self._probe(name))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        K, n, t, d = x.shape
        H = self.cfg.n_heads
        h = rms_norm(x, self.attn_norm, self.cfg.norm_eps, self._probe("attn_norm"))
        q, k, v = self._linear(h, "wqkv").split(d, dim=-1)
        # (K, n, t, d) -> (K*n, H, t, hd): one SDPA call for every member and sequence
        q, k, v = (z.reshape(K * n, t, H, d // H).transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(K, n, t, d)
        x = x + self._linear(y, "wo")
        h = rms_norm(x, self.mlp_norm, self.cfg.norm_eps, self._probe("mlp_norm"))
        h = F.silu(self._linear(h, "w_gate")) * self._linear(h, "w_up")
        return x + self._linear(h, "w_down")


class GPT(nn.Module):
    """A GPT with a leading member axis K on every parameter (K models, one forward).

    `cfg.vocab_size` must be set (take it from the data). Built initialised from `seed`
    (`init_weights`; every member the same weights); `seed=None` leaves the weights
    uninitialised, for a caller that loads or initialises them itself."""

    def __init__(self, cfg: ModelConfig, members: int = 1, seed: int | None = 0):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building (take it from the data)")
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        K, d = members, cfg.d_model
        self.cfg, self.members = cfg, members
        # GNS probes by parameter name; empty means plain autograd everywhere.
        self.probes: dict = {}
        self.wte = nn.Parameter(torch.empty(K, cfg.vocab_size, d))
        self.blocks = nn.ModuleList(Block(cfg, K, i, self.probes) for i in range(cfg.n_layers))
        self.norm_f = nn.Parameter(torch.ones(K, d))
        self.head = nn.Parameter(torch.empty(K, cfg.vocab_size, d))
        cos, sin = rope_tables(cfg.context, d // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if seed is not None:
            self.init_weights(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) matrices and embeddings, ones for gains; every member identical.

        Members start from the same weights (common random numbers): differences
        between their trajectories then come from lr and wd alone.
        """
        std = self.cfg.init_std
        where = generator.device if generator is not None else torch.device("cpu")
        for name, p in self.named_parameters():
            if param_kind(name, p) == "gain":
                p.fill_(1.0)
                continue
            if p.is_meta:  # shapes only (memory sizing): nothing to draw
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w_down")) else std
            # drawn where the generator lives, then copied: a CPU generator cannot fill a CUDA tensor,
            # and one seed gives the same weights on every device
            one = torch.empty(p.shape[1:], device=where).normal_(0.0, s, generator=generator)
            p.copy_(one.expand_as(p))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits (K, n, t, vocab); with targets also the per-member mean loss (K,), or with
        reduction="none" every token's loss (K, n, t) (the evaluator's per-window losses)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        n, t = idx.shape
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model context {self.cfg.context}")
        # index_select, not self.wte[:, idx]: the advanced-indexing backward accumulates rows with
        # parallel atomic adds on CPU, so repeated tokens sum in a thread-dependent order (the
        # gradient, and from it the whole run, differed between identical runs) and it measured
        # ~10x slower; index_select's backward (index_add) is deterministic
        x = torch.index_select(self.wte, 1, idx.reshape(-1)).view(self.members, n, t, -1)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = rms_norm(x, self.norm_f, self.cfg.norm_eps, self.probes.get("norm_f"))
        logits = member_linear(x, self.head, self.probes.get("head"))
        if targets is None:
            return logits, None
        K, V = self.members, logits.shape[-1]
        loss = F.cross_entropy(
            logits.reshape(K * n * t, V).float(), targets.reshape(1, n * t).expand(K, -1).reshape(-1),
            reduction="none",
        )
        if reduction == "none":
            return logits, loss.view(K, n, t)
        return logits, loss.view(K, n * t).mean(1)


def param_kind(name: str, p: torch.Tensor) -> str:
    """'embedding', 'gain' or 'matrix': what the decay config selects on."""
    if name == "wte":
        return "embedding"
    return "gain" if p.dim() == 2 else "matrix"


def count_params(model: GPT, per_member: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    return total // model.members if per_member else total


def member_slice(model: GPT, k: int) -> dict[str, torch.Tensor]:
    """Member k's weights as a K=1 state dict (copies)."""
    return {name: p.detach()[k : k + 1].clone() for name, p in model.named_parameters()}
