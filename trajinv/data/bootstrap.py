"""Validation-window bootstrap: fixed resamples of the validation windows, shared by every member.

The validation set is a fixed list of windows scored for every member (`validation_batches`).
Resampling those windows with replacement shows how much a loss owes to which windows
happened to be in the set. The trainer uses the *same* B index sets for every member and
every eval, so resample b of member i and resample b of member j average the same windows:
analysis computes any statistic of several members (a spread, a difference of spreads) once
per resample and reads its noise off the B values, paired across members as the members are
(docs/design.md, "Spreads and their noise"). It is the noise of the finite validation set,
not of training: seed-to-seed variation needs replicate runs.
"""

from __future__ import annotations

import numpy as np
import torch

from trajinv.data.batches import check_int

BOOT_SEED = 20250925
"""Fixed seed of the resamples: they depend on (n_windows, n_boot) only, so a resumed run and
every member and step of a run see the same ones."""


def window_resamples(n_windows: int, n_boot: int, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_windows, n_boot) float64 counts: column b says how often each window is drawn in resample b.

    Resample b draws n_windows window indices with replacement: PCG64 seeded by
    ``SeedSequence([seed, n_windows, n_boot])``, its raw 64-bit output (stable across NumPy
    versions) modulo n_windows, the same reduction as `sample_batch`.
    """
    n_windows = check_int("n_windows", n_windows, 1)
    n_boot = check_int("n_boot", n_boot, 0)
    raw = np.random.PCG64(np.random.SeedSequence([seed, n_windows, n_boot])).random_raw(n_boot * n_windows)
    idx = (raw % np.uint64(n_windows)).astype(np.int64).reshape(n_boot, n_windows)
    flat = idx + np.arange(n_boot, dtype=np.int64)[:, None] * n_windows
    counts = np.bincount(flat.ravel(), minlength=n_boot * n_windows).reshape(n_boot, n_windows)
    return counts.T.astype(np.float64)


def boot_means(per_window: torch.Tensor | np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, n_boot) means of each member's per-window losses (K, n_windows) under each resample.

    One (K, n) x (n, B) product in float64: negligible beside the evaluation forward."""
    w = per_window.detach().cpu().double().numpy() if isinstance(per_window, torch.Tensor) else per_window
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != counts.shape[0]:
        raise ValueError(f"per-window losses of shape {w.shape} do not match {counts.shape[0]} windows")
    return w @ counts / counts.shape[0]


def boot_se(boot: np.ndarray) -> np.ndarray:
    """Bootstrap standard error along the last axis (sample std, ddof 1); NaN with < 2 resamples."""
    boot = np.asarray(boot, dtype=np.float64)
    if boot.shape[-1] < 2:
        return np.full(boot.shape[:-1], np.nan)
    return boot.std(axis=-1, ddof=1)
