"""One token budget's optimum, read from what `trajinv sweep` or `trajinv tune` wrote.

A **sweep directory** (an lr x wd grid, or any members) gives its members' final
validation losses straight to `scaling.optimum_from_members`.

A **tune directory** (``tune.json``) is two crossing lines rather than a grid. The
*anchor* is the best member of the searched lines (scans, shifts, rescans, the zoom,
along the tune's final axis; not the recommendation, which may be a check member off
them). Line S is the searched line through the anchor: ELR varied at its lr (axis
ELR), or lr varied at its wd (axis lr). Line C is the invariance check that crosses
S, the one nearest the anchor: lr varied at one ELR (axis ELR), wd varied at one lr
(axis lr). The tune checks before it zooms, so C passes through the best member S
had when it was checked, at most half a scan spacing from a zoomed anchor; after a
rescan, S starts at C's best member, so the two still cross at a member. Along ELR,
S locates the optimal ELR and C the optimal lr; along lr, S the optimal lr and C the
optimal wd. A 2-D quadratic is not identifiable from two crossing lines, so each line
gets its own 1-D fit, and the optimum is where they put it (the ratio or product of
the two, its log2 variance the sum of theirs). A line with fewer than 3 values leaves
its quantity untuned (lr without a check line: `tuned_axes` says so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trajinv.analysis.records import load_metrics, load_summary
from trajinv.analysis.scaling import BudgetOptimum, MemberLoss, ScalingReport, fit_scaling, optimum_from_members, plot_scaling
from trajinv.atomic import atomic_write

TUNE_RESULT = "tune.json"  # trajinv.tune.report.RESULT (analysis does not import the tuner)


def load_budget(directory: str | Path, n_boot: int = 500, seed: int = 0) -> BudgetOptimum:
    """The optimum of the sweep or tune in `directory` (see the module doc); one-line errors."""
    root = Path(directory)
    if (root / TUNE_RESULT).is_file():
        return _from_tune(root, n_boot, seed)
    if (root / "summary.csv").is_file():
        return _from_sweep(root, n_boot, seed)
    raise FileNotFoundError(f"{str(root)!r} holds neither a tune ({TUNE_RESULT}) nor a sweep (summary.csv)")


def fit_directories(directories, target_tokens: float | None = None) -> ScalingReport:
    """`fit_scaling` over the optima of tune or sweep directories at several budgets."""
    return fit_scaling([load_budget(d) for d in directories], target_tokens=target_tokens)


def write_scaling(report: ScalingReport, out: str | Path) -> list[Path]:
    """scaling.json and scaling.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(report.to_dict(), indent=1)
    return [atomic_write(out / "scaling.json", lambda f: f.write(data), mode="w"),
            plot_scaling(report, out / "scaling.png")]


def _from_sweep(root: Path, n_boot: int, seed: int) -> BudgetOptimum:
    rows = load_summary(root)
    if not rows:
        raise ValueError(f"{root}/summary.csv has no members")
    se = final_val_loss_se(root)
    members = [MemberLoss(float(r["lr"]), float(r["wd"]), _loss(r), se.get((str(r["run_id"]), int(r["member"])), 0.0))
               for r in rows]
    tokens, steps = _budget(rows, root)
    return optimum_from_members(members, tokens, steps, source=root.name, n_boot=n_boot, seed=seed)


def _from_tune(root: Path, n_boot: int, seed: int) -> BudgetOptimum:
    try:
        data = json.loads((root / TUNE_RESULT).read_text())
    except ValueError:
        raise ValueError(f"{root / TUNE_RESULT} is not valid JSON") from None
    if not data.get("recommendation"):
        raise ValueError(f"the tune in {root} has no recommendation (every member diverged)")
    axis = data.get("axis", "elr")
    stages = [s for s in data["stages"] if s.get("axis", axis) == axis]  # an lr tune's first ELR scan aside
    rows = [r for s in data["stages"] for r in load_summary(root / s["directory"])]
    tokens, steps = _budget(rows, root)
    searched = [o for s in stages if s["kind"] != "check" for o in s["outcomes"] if _finite(o)]
    if not searched:
        raise ValueError(f"the tune in {root} has no finished member on its {axis} line")
    anchor = min(searched, key=lambda o: o["loss"])
    outcomes = [o for s in stages for o in s["outcomes"]]
    close = lambda o, key, value: math.isclose(o[key], value, rel_tol=1e-6)  # noqa: E731
    member = lambda o, wd: MemberLoss(o["lr"], wd, o["loss"], o["se"] or 0.0)  # noqa: E731
    # line C's fixed value: the ELR (axis ELR) or lr (axis lr) of the check crossing line S nearest the anchor
    across, along = ("elr", "lr") if axis == "elr" else ("lr", "wd")
    crossing = [o[across] for s in stages if s["kind"] == "check" for o in s["outcomes"][:1]
                if any(close(m, across, o[across]) and close(m, along, anchor[along]) for m in outcomes)]
    at = min(crossing, key=lambda v: abs(math.log2(v / anchor[across])), default=anchor[across])
    # the line that varies wd at one lr (S along ELR, C along lr): the optimal wd
    lr_fixed = anchor["lr"] if axis == "elr" else at
    wd_line = _unique([member(o, o["wd"]) for o in outcomes if close(o, "lr", lr_fixed)])
    # the line that varies lr at one ELR (C along ELR) or one wd (S along lr), in coordinates where only
    # lr varies
    fixed = "elr" if axis == "elr" else "wd"
    value = at if axis == "elr" else anchor["wd"]
    lr_line = _unique([member(o, value) for o in outcomes if close(o, fixed, value)])
    if len({m.wd for m in wd_line}) < 2:  # an lr tune whose check the budget skipped
        raise ValueError(f"the tune in {root} varied wd only at one value through its best member "
                         f"(lr={lr_fixed:g}, best wd={anchor['wd']:g}), so its optimal wd is not located; "
                         "rerun it with a larger --budget so that its check runs")
    by_wd = optimum_from_members(wd_line, tokens, steps, source=root.name, n_boot=n_boot, seed=seed)
    if len({m.lr for m in lr_line}) < 3:
        return by_wd  # lr not varied enough to fit: untuned, and the report says so
    by_lr = optimum_from_members(lr_line, tokens, steps, source=root.name, n_boot=n_boot, seed=seed + 1)
    lr = by_lr.lr
    if fixed == "elr":  # C located lr (at its ELR, near the optimal ELR that S located)
        elr = by_wd.elr
        se = {"lr": by_lr.log2_se["lr"], "elr": by_wd.log2_se["elr"]}
        se["wd"] = math.hypot(se["lr"], se["elr"])
        wd = elr / lr
    else:  # S located lr at its wd, C the optimal wd
        wd = by_wd.wd
        se = {"lr": by_lr.log2_se["lr"], "wd": by_wd.log2_se["wd"]}
        se["elr"] = math.hypot(se["lr"], se["wd"])
        elr = lr * wd
    edges = tuple(dict.fromkeys(("wd",) * by_wd.at_edge + ("lr",) * by_lr.at_edge))
    return BudgetOptimum(tokens=tokens, steps=steps, lr=lr, wd=wd, elr=elr, log2_se=se, at_edge=bool(edges),
                         source=root.name, edge_axes=edges, tuned_axes=("lr", "wd"))


def _finite(outcome: dict) -> bool:
    return outcome.get("loss") is not None and math.isfinite(outcome["loss"])


def _unique(members: list[MemberLoss]) -> list[MemberLoss]:
    """One member per (lr, wd): a point evaluated by two stages counts once (the first)."""
    seen: dict[tuple[float, float], MemberLoss] = {}
    for m in members:
        seen.setdefault((round(math.log2(m.lr), 9), round(math.log2(m.wd), 9)), m)
    return list(seen.values())


def _loss(row: dict) -> float | None:
    v = row.get("final_val_loss")
    return float(v) if row.get("status") == "done" and v is not None and math.isfinite(float(v)) else None


def _budget(rows: list[dict], root: Path) -> tuple[float, int]:
    """(tokens, steps) of a finished member's run: the budget every member of a directory shares."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        raise ValueError(f"no finished member in {root}: its token budget is unknown")
    return float(done[0]["tokens"]), int(done[0]["steps"])


def final_val_loss_se(root: str | Path) -> dict[tuple[str, int], float]:
    """The last logged `val_loss_se` of each (run_id, member) of a sweep (empty when none was logged)."""
    se: dict[tuple[str, int], float] = {}
    if not any(Path(root).glob("runs/*/metrics.jsonl")):
        return se
    for rec in load_metrics(root):
        v = rec.get("val_loss_se")
        if v is not None and rec.get("val_loss") is not None and math.isfinite(v):
            se[(str(rec["run_id"]), int(rec["member"]))] = float(v)
    return se
