"""The gradient noise scale, measured while training.

- `estimator`: the maths: small/big-batch estimators, their scaling, smoothing,
  the per-step `GNSTracker` (pure functions and a little state; no kernels).
- `meter`: the trainer's `GNSMeter`: probes for per-example norms, micro-batch
  accumulation with norms, and the estimator, one object per population run.

The probes themselves live in the model's ops (`trajinv.ops`), the fused norm
kernels in `trajinv.kernels`. Settings: `trajinv.config.GNSConfig`.
"""

from trajinv.config import GNSConfig
from trajinv.gns.estimator import (
    DebiasedEMA,
    GNSTracker,
    micro_batch_sq_mean,
    noise_scale,
    per_example_sq_mean,
    precond_active,
    small_big_estimates,
)
from trajinv.gns.meter import LOG_KEYS, GNSMeter

__all__ = ["DebiasedEMA", "GNSConfig", "GNSMeter", "GNSTracker", "LOG_KEYS", "micro_batch_sq_mean", "noise_scale",
           "per_example_sq_mean", "precond_active", "small_big_estimates"]
