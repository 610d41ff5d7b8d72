"""What a sweep says: its records, the invariance it shows, and pictures of both.

- `records`: read metrics and the summary; one `Curve` per member.
- `invariance`: iso-LR and iso-ELR groups, their spreads early and late, the
  LR -> ELR transition (`analyze_sweep`).
- `plots`: PNG figures of a sweep (`plot_sweep`).
"""

from trajinv.analysis.invariance import InvarianceReport, analyze_sweep, invariance_report, transition_step
from trajinv.analysis.plots import plot_sweep
from trajinv.analysis.records import Curve, curves, load_metrics, load_summary

__all__ = ["Curve", "InvarianceReport", "analyze_sweep", "curves", "invariance_report", "load_metrics",
           "load_summary", "plot_sweep", "transition_step"]
