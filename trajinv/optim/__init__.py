"""AdamW for populations: `FusedAdamW` (a drop-in `torch.optim.Optimizer`) and the trainer's adapters.

- `fused_adamw`: the optimizer class (groups, state, read-outs, state dict).
- `hyper`, `buckets`, `engines`: its hyperparameter table, flat buffers and the
  functional step engines (Triton, native CPU, torch ops) it dispatches to.
- `population`: the trainer's interface over FusedAdamW or torch.optim.AdamW.
"""

from trajinv.optim.fused_adamw import AdamWStats, FusedAdamW
from trajinv.optim.engines import stochastic_round_bf16

__all__ = ["AdamWStats", "FusedAdamW", "stochastic_round_bf16"]
