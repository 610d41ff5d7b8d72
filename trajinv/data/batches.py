"""Batches from a token stream: seeded training windows and a fixed validation set."""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajinv.config import PRESETS
from trajinv.data.sources import DataError


def check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise DataError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _source_of(tokens: np.ndarray) -> str:
    """The data source a cached split was tokenized from, for messages: its manifest sits beside the memmap."""
    try:
        return repr(json.loads((Path(tokens.filename).parent / "manifest.json").read_text())["source"])
    except (AttributeError, TypeError, OSError, ValueError, KeyError):
        return "the data"


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    buf = np.asarray(tokens[idx], dtype=np.int64)
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for training step ``step``: ``x, y`` int64 of shape (batch_size, seq_len), ``y`` = ``x`` shifted by one.

    Starts come from PCG64 seeded by ``SeedSequence([seed, step])``: its raw 64-bit
    output, which NumPy guarantees stable across versions and platforms, reduced
    modulo the number of starts (bias below 2^-24 for any corpus under 2^40 tokens).
    No state is carried between calls, so resuming at step s reproduces the
    uninterrupted stream, and members that share seed and step share batches.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    seq_len = check_int("seq_len", seq_len, 1)
    seed = check_int("seed", seed, 0)
    step = check_int("step", step, 0)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_starts = tokens.size - seq_len
    if n_starts < 1:
        raise DataError(f"seq_len {seq_len} needs at least {seq_len + 1} tokens, got {tokens.size}")
    raw = np.random.PCG64(np.random.SeedSequence([seed, step])).random_raw(batch_size)
    starts = (raw % np.uint64(n_starts)).astype(np.int64)
    return _windows(tokens, starts, seq_len)


def check_validation(tokens: np.ndarray, seq_len: int, n_seqs: int) -> None:
    """DataError (one line, in the CLI's terms) unless `tokens` hold `n_seqs` windows of `seq_len` + 1."""
    seq_len = check_int("seq_len", seq_len, 1)
    n_seqs = check_int("n_seqs", n_seqs, 1)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    fit = tokens.size // (seq_len + 1)
    if not fit:  # no --eval-seqs helps: a shorter context is the way out, and the CLI sets it by --preset alone
        raise DataError(f"the validation split of {_source_of(tokens)} holds {tokens.size} tokens, too few for one "
                        f"window of context {seq_len} + 1 tokens: {_shorter_context(seq_len, tokens.size, n_seqs)}")
    if n_seqs > fit:
        raise DataError(f"the validation split of {_source_of(tokens)} holds {tokens.size} tokens, enough for at most "
                        f"{fit} window{'s' * (fit != 1)} of context {seq_len} + 1 tokens, not --eval-seqs {n_seqs}: "
                        f"lower --eval-seqs to at most {fit} (or give more data)")


def _shorter_context(seq_len: int, size: int, n_seqs: int) -> str:
    """The way out of a validation split of `size` tokens too short for one window of `seq_len` + 1: more
    data, or each preset with a context that fits (and the --eval-seqs its windows allow)."""
    fits = []
    for name, model in PRESETS.items():
        windows = size // (model.context + 1)
        if model.context < seq_len and windows:
            allows = f"; --eval-seqs at most {windows}" if windows < n_seqs else ""
            fits.append(f"--preset {name} (context {model.context}{allows})")
    if fits:
        return f"give more data, or a shorter context: {', '.join(fits)}"
    name, model = min(PRESETS.items(), key=lambda item: item[1].context)
    if model.context > seq_len:  # a context no preset has (the API's ModelConfig): no preset is shorter
        return "give more data"
    return (f"give more data (the shortest context, --preset {name}'s {model.context}, needs {model.context + 1} "
            "tokens)")


def validation_batches(tokens: np.ndarray, seq_len: int, n_seqs: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``n_seqs`` non-overlapping, evenly spaced windows of
    ``seq_len + 1`` tokens covering the split, as batches of at most ``batch_size``.

    ``TrainConfig.eval_seqs`` (512) is the recommended ``n_seqs``; see `trajinv.data`.
    """
    check_validation(tokens, seq_len, n_seqs)
    batch_size = check_int("batch_size", batch_size, 1)
    width = seq_len + 1
    stride = (tokens.size - width) // (n_seqs - 1) if n_seqs > 1 else 0
    starts = np.arange(n_seqs, dtype=np.int64) * stride
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n_seqs, batch_size)]


