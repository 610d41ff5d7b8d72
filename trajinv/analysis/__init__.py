"""What training runs say: their records, the invariance they show, and pictures of it.

- `records`: read metrics and the summary; one `Curve` per member.
- `invariance`: iso-LR and iso-ELR groups (within one batch-size schedule), their
  spreads early and late, the LR -> ELR transition (`analyze_sweep`).
- `spreads`: max-min, the per-octave gap, and their validation-bootstrap noise.
- `plots`: PNG figures of a sweep (`plot_sweep`).
- `phase`: one run's weight-norm equilibrium and regime, without a grid.
- `scaling`: optimal lr / wd / ELR against the token budget, as power laws.
- `tuning_curves`: expected best loss after n random-search trials (opda).
- `budgets`: one token budget's optimum from a sweep or tune directory (`trajinv fit`).
- `report`: the text and plots of `trajinv analyze`.
"""

from trajinv.analysis.invariance import InvarianceReport, analyze_sweep, invariance_report, transition_step
from trajinv.analysis.plots import plot_sweep
from trajinv.analysis.records import Curve, curves, load_metrics, load_summary

__all__ = ["Curve", "InvarianceReport", "analyze_sweep", "curves", "invariance_report", "load_metrics",
           "load_summary", "plot_sweep", "transition_step"]
