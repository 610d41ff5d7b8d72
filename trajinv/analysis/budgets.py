"""One token budget's optimum, read from what `trajinv sweep` or `trajinv tune` wrote.

A **sweep directory** (an lr x wd grid, or any members) gives its members' final
validation losses straight to `scaling.optimum_from_members`, once it is one budget
and finished. One budget: a sweep may train several batch sizes or batch schedules
(`--batch-size 32 --batch-size 256`), each with its own optimum (and, at fixed steps,
its own tokens), whose members share (lr, wd) values; merged, they would locate an
optimum of neither. So a sweep whose finished members hold more than one batch size
is refused unless one is selected (`batch_size`, `trajinv fit --batch-size`) or every
other one has finished all diverged (`_implied_batch_size`), and the
finished members must share one (tokens, steps). Finished: every member of its
`spec.json` grid (at the selected batch size) is done or diverged (a diverged member
is an outcome: the loss there is no good); one missing from summary.csv (an
interrupted sweep lists only its finished populations), failed or still running
would leave a hole that can move the optimum, so the sweep is refused.

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
the two, its log2 variance the sum of theirs). An lr line with fewer than 3 values leaves
lr untuned (`tuned_axes` says so); a wd line with a single value is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trajinv.analysis.records import chance_loss, load_metrics, load_summary
from trajinv.analysis.scaling import (BudgetOptimum, MemberLoss, ScalingReport, check_budget_count,
                                      check_target_tokens, fit_scaling, optimum_from_members, plot_scaling)
from trajinv.atomic import atomic_write, remove_stale_temps
from trajinv.checkpoint import latest_meta
from trajinv.config import sweep_pairs
from trajinv.metrics import METRICS
from trajinv.rundirs import SWEEP_SPEC, TUNE_SPEC, owner

TUNE_RESULT = "tune.json"  # trajinv.tune.report.RESULT (analysis does not import the tuner)


def load_budget(directory: str | Path, n_boot: int = 2000, seed: int = 0,
                batch_size: str | int | None = None) -> BudgetOptimum:
    """The optimum of the sweep or tune in `directory` (see the module doc); one-line errors.

    `batch_size` ('32', '32@0.1,256') keeps only a sweep's members at that batch size or
    schedule; a tune trained at another one is refused.
    """
    root = Path(directory)
    if (root / TUNE_RESULT).is_file():
        return _from_tune(root, n_boot, seed, batch_size)
    if (root / "summary.csv").is_file():
        return _from_sweep(root, n_boot, seed, batch_size)
    if (root / TUNE_SPEC).is_file():
        raise ValueError(f"the tune in {str(root)!r} has not finished (no {TUNE_RESULT} yet): rerun its "
                         "`trajinv tune` command to finish it")
    if (root / SWEEP_SPEC).is_file():
        raise ValueError(f"the sweep in {str(root)!r} has not finished a population yet (no summary.csv): rerun "
                         f"its `trajinv {owner(root)}` command to finish it")
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} does not exist" if not root.exists() else
                                f"{str(root)!r} is a file, not a tune or sweep directory")
    raise FileNotFoundError(f"{str(root)!r} holds neither a tune ({TUNE_RESULT}) nor a sweep (summary.csv)")


def fit_directories(directories, target_tokens: float | None = None,
                    batch_size: str | int | None = None) -> ScalingReport:
    """`fit_scaling` over the optima of tune or sweep directories at several budgets (at `batch_size`).

    The directories must differ in their budget only: one model, corpus, optimizer, lr schedule
    (its warmup aside) and batch size (`study_setting`); a constant-lr sweep beside WSD tunes
    moved the fitted lr exponent from -0.10 to +0.11 in a QA run, with no word. Seeds may differ
    (they add noise, not a bias)."""
    check_budget_count([str(d) for d in directories])  # before the loads (each bootstraps its optimum), as given
    check_target_tokens(target_tokens)
    optima = [load_budget(d, batch_size=batch_size) for d in directories]
    first, setting = directories[0], study_setting(directories[0], batch_size)
    for d in directories[1:]:
        other = study_setting(d, batch_size)
        # what one directory does not record (no checkpoint to say which corpus) is not compared
        differs = "; ".join(f"{k}: {json.dumps(setting[k])} in {str(first)!r}, {json.dumps(other[k])} in {str(d)!r}"
                            for k in sorted(setting.keys() & other.keys()) if setting[k] != other[k])
        if differs:
            raise ValueError(f"a budget study varies the budget only, but {differs}; fit directories trained "
                             "alike (warmup and seed may differ)")
    return fit_scaling(optima, target_tokens=target_tokens)


def study_setting(directory: str | Path, batch_size: str | int | None = None) -> dict[str, object]:
    """What a budget study holds fixed, as dotted names -> values: the model, the optimizer's settings
    (not its implementation), the lr schedule but its warmup (and the fields its kind does not use),
    the batch size (the one `batch_size` selects from a sweep), and the corpus. The corpus is the
    identity a run's checkpoint keeps (its text's hash, tokenizer, split: a moved file is the same
    corpus, an edited one is not), else the data options as given. Names the directory does not
    record are left out."""
    root = Path(directory)
    if (root / TUNE_RESULT).is_file():
        stages = json.loads((root / TUNE_RESULT).read_text())["stages"]
        # tune_spec.json, else a stage's spec.json: both hold the training and data options
        spec = _spec(root, TUNE_SPEC) or next(
            (s for d in _dirs(root, "stages/*") if (s := _spec(d))), {})
        batch = _batch_sizes(_tune_rows(root, stages))
        runs = _dirs(root, "stages/*/runs/*")
    else:
        spec = _run_spec(root)
        batch = _batch_sizes(_one_batch_size(load_summary(root), root, batch_size)[0])
        runs = [*_dirs(root, "runs/*"), root]  # a sweep's runs, or a `trajinv train` folder itself
    train = spec.get("train") or {}
    schedule = dict(train.get("schedule") or {})
    unused = {"constant": ("decay_fraction", "min_ratio"), "cosine": ("decay_fraction",)}.get(schedule.get("kind"), ())
    corpus = next((meta["data"] for r in runs if isinstance((meta := latest_meta(r) or {}).get("data"), dict)), None)
    parts = {"model": train.get("model"), "optim": train.get("optim"), "schedule": schedule,
             "corpus" if corpus else "data": corpus or spec.get("data")}
    # which kernels, the warmup, the vocabulary (the tokenizer's, filled in), where files live, a seed nothing reads
    leave = {"optim.name", "schedule.warmup", "model.vocab_size", "data.cache_dir", "data.seed",
             *(f"schedule.{k}" for k in unused)}
    flat = {"batch_size": ",".join(batch)}
    for part, values in parts.items():
        for key, value in (values or {}).items():
            if f"{part}.{key}" not in leave:
                flat[f"{part}.{key}"] = value
    return flat


def _dirs(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_dir())


def _run_spec(root: Path) -> dict:
    """A sweep's spec.json, else (a `trajinv train` folder) its checkpoint's config as the spec's train."""
    return _spec(root) or {"train": (latest_meta(root) or {}).get("config")}


def write_scaling(report: ScalingReport, out: str | Path) -> list[Path]:
    """scaling.json and scaling.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, "scaling.*")  # of a fit killed while it wrote
    data = json.dumps(report.to_dict(), indent=1)
    return [atomic_write(out / "scaling.json", lambda f: f.write(data), mode="w"),
            plot_scaling(report, out / "scaling.png")]


def _from_sweep(root: Path, n_boot: int, seed: int, batch_size: str | int | None = None) -> BudgetOptimum:
    # the fits and the regime claims are of torch-mode wd (decay per step lr*wd); independent wd is lr times it.
    # A `trajinv train` folder has no spec.json: its checkpoint's config says.
    if _decay_mode(_run_spec(root)) == "independent":
        raise ValueError(f"the sweep in {root} trained with --decay-mode independent; fit models torch-mode weight "
                         "decay (decay per step lr*wd): sweep with --decay-mode torch")
    rows = load_summary(root)
    if not rows:
        raise ValueError(f"{root}/summary.csv has no members")
    rows, batch_size = _one_batch_size(rows, root, batch_size)
    _check_finished(rows, root, batch_size)
    se = final_val_loss_se(root)
    chance = _chance(root)
    members = [MemberLoss(float(r["lr"]), float(r["wd"]), _loss(r, chance),
                          se.get((str(r["run_id"]), int(r["member"])), 0.0)) for r in rows]
    tokens, steps = _budget(rows, root)
    return optimum_from_members(members, tokens, steps, source=root.name, n_boot=n_boot, seed=seed)


def _from_tune(root: Path, n_boot: int, seed: int, batch_size: str | int | None = None) -> BudgetOptimum:
    try:
        data = json.loads((root / TUNE_RESULT).read_text())
    except ValueError:
        raise ValueError(f"{root / TUNE_RESULT} is not valid JSON") from None
    if not data.get("recommendation"):
        raise ValueError(f"the tune in {root} has no recommendation (every member diverged)")
    axis = data.get("axis", "elr")
    # every stage, an lr tune's first ELR scan too: the lr search reads its members instead of training them
    # again (its lr scan's centre, often the best point, and the iso-LR check members at that lr)
    stages = data["stages"]
    # a stage whose every point was untrainable (lr*wd >= 1) trained nothing: no directory (tune.json from
    # before that gave one that was never made, hence the file check)
    rows = _tune_rows(root, stages)
    if batch_size is not None and (found := _batch_sizes(rows)) != [_bs(batch_size)]:
        raise ValueError(f"the tune in {root} trained at batch size {', '.join(found)}, not {_bs(batch_size)} "
                         "(--batch-size)")
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
    # (the checked point of tune.json's invariant_check too: a check whose members were all trained before,
    # by the first scan, trains no stage of its own)
    checked = (data.get("invariant_check") or {}).get("points", [])[:1]
    lines = [o for s in stages if s["kind"] == "check" for o in s["outcomes"][:1]] + checked
    crossing = [o[across] for o in lines
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
    # the searched line (S) is fitted as the tune fits it: its zoom put members irregularly near the best; the
    # check line (C) holds the check factors, regular (1 octave by default, not the scan's spacing): level-
    # neighbours there, or a window of 0.75 octave at a 0.5-octave scan left its best member alone
    window = _fit_window(data)
    searched_wd = axis == "lr"  # along lr, S varies lr and C varies wd; along ELR, S varies wd (ELR at one lr)
    by_wd = optimum_from_members(wd_line, tokens, steps, source=root.name, n_boot=n_boot, seed=seed,
                                 window=None if searched_wd else window)
    if len({m.lr for m in lr_line}) < 3:
        return by_wd  # lr not varied enough to fit: untuned, and the report says so
    by_lr = optimum_from_members(lr_line, tokens, steps, source=root.name, n_boot=n_boot, seed=seed + 1,
                                 window=window if searched_wd else None)
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


FIT_WINDOW = 1.5
"""A tune line's fit takes the members within this many scan spacings of the best: the tune's own rule
(`trajinv.tune.search`, "zoom"; tests hold the two equal)."""


def _fit_window(data: dict) -> float | None:
    """The fit window in octaves of a tune.json (None, level-neighbours, when its spec does not say)."""
    search = (data.get("spec") or {}).get("search") or {}
    try:
        return FIT_WINDOW * float(search["octaves"]) / (int(search["points"]) - 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _finite(outcome: dict) -> bool:
    return outcome.get("loss") is not None and math.isfinite(outcome["loss"])


def _unique(members: list[MemberLoss]) -> list[MemberLoss]:
    """One member per (lr, wd): a point evaluated by two stages counts once (the first)."""
    seen: dict[tuple[float, float], MemberLoss] = {}
    for m in members:
        seen.setdefault((round(math.log2(m.lr), 9), round(math.log2(m.wd), 9)), m)
    return list(seen.values())


def _loss(row: dict, chance: float) -> float | None:
    """A finished member's final validation loss; None (diverged) when it is not finite or is above a
    uniform guess's ln V, as analyze and the tune count it (lr 4 ends at 304 with status done)."""
    v = row.get("final_val_loss")
    if row.get("status") != "done" or v is None or not math.isfinite(float(v)):
        return None
    return float(v) if float(v) < chance else None  # at ln V or above: diverged, as the tune's `_outcomes`


def _chance(root: Path) -> float:
    """ln V of a sweep's runs (the first metrics record that gives a vocab_size); inf when none does."""
    for path in sorted(root.glob(f"runs/*/{METRICS}")):
        try:
            with path.open() as f:
                for line in f:
                    vocab = json.loads(line).get("vocab_size") if line.strip() else None
                    if vocab:
                        return chance_loss(vocab)
        except (OSError, ValueError, AttributeError):
            continue
    return math.inf


def _budget(rows: list[dict], root: Path) -> tuple[float, int]:
    """(tokens, steps) of a finished member's run: the budget every member of a directory shares."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        raise ValueError(f"no finished member in {root}: its token budget is unknown")
    budgets = list(dict.fromkeys((float(r["tokens"]), int(r["steps"])) for r in done))
    if len(budgets) > 1:
        listed = ", ".join(f"{t:g} tokens in {n} steps" for t, n in budgets)
        raise ValueError(f"the finished members in {root} trained {len(budgets)} budgets ({listed}); "
                         "one directory must hold one budget")
    return budgets[0]


def _bs(value) -> str:
    """A batch size or schedule as text to compare: summary.csv reads '32' as the number 32."""
    return "?" if value is None else str(value).replace(" ", "")


def _tune_rows(root: Path, stages: list[dict]) -> list[dict]:
    """The summary rows of a tune's stages."""
    return [r for s in stages if s.get("directory") and (root / s["directory"] / "summary.csv").is_file()
            for r in load_summary(root / s["directory"])]


def _batch_sizes(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(_bs(r.get("batch_size")) for r in rows))


def _one_batch_size(rows: list[dict], root: Path, batch_size: str | int | None
                    ) -> tuple[list[dict], str | int | None]:
    """(the rows of one batch size or schedule, that one or None for all): `batch_size`, else the one the
    finished members share (`_implied_batch_size`)."""
    batch_size = _implied_batch_size(rows, root, batch_size)
    if batch_size is not None:
        chosen = [r for r in rows if _bs(r.get("batch_size")) == _bs(batch_size)]
        if not chosen:
            raise ValueError(f"the sweep in {root} has no member at batch size {_bs(batch_size)} "
                             f"(it holds {', '.join(_batch_sizes(rows))})")
        return chosen, batch_size
    found = _batch_sizes([r for r in rows if r.get("status") == "done"])
    if len(found) > 1:
        raise ValueError(f"the sweep in {root} holds finished members at {len(found)} batch sizes "
                         f"({', '.join(found)}), each with its own optimum; pick one with --batch-size B")
    return rows, None


def _implied_batch_size(rows: list[dict], root: Path, batch_size: str | int | None) -> str | int | None:
    """`batch_size`, else the only batch size with members that trained to a loss when every other one has
    finished with all its members diverged: those are another setting's outcomes, and mixed in they would
    mark this budget's (lr, wd) points diverged. None when no batch size stands out that way."""
    if batch_size is not None:
        return batch_size
    chance = _chance(root)
    trained = _batch_sizes([r for r in rows if _loss(r, chance) is not None])
    if len(trained) != 1:
        return None
    sizes = dict.fromkeys(_batch_sizes(rows) + [_bs(b) for b in _spec(root).get("batch_sizes") or []])
    others = [b for b in sizes if b != trained[0]]
    for b in others:  # none trained to a loss; all finished? (else refused as incomplete, naming --batch-size)
        if _missing([r for r in rows if _bs(r.get("batch_size")) == b], root, b)[0]:
            return None
    return trained[0] if others else None


def _key(lr, wd) -> tuple[float, float]:
    """A member's (lr, wd) as `sweep_pairs` rounds it."""
    return float(f"{float(lr):.12g}"), float(f"{float(wd):.12g}")


def _grid_members(spec: dict) -> set[tuple[float, float]]:
    """The members of a sweep's spec.json, as the sweep pairs them."""
    return set(sweep_pairs(*(spec.get(k) or [] for k in ("lrs", "wds", "elrs", "points")), _decay_mode(spec)))


def _decay_mode(spec: dict) -> str:
    """The sweep's `OptimConfig.decay_mode` ('torch' when the spec does not say)."""
    train = spec.get("train")
    optim = train.get("optim") if isinstance(train, dict) else None
    return (optim.get("decay_mode") if isinstance(optim, dict) else None) or "torch"


def unfinished(root: str | Path, batch_size: str | int | None = None) -> tuple[int, int, list[str]]:
    """(members not finished, members in all, why: e.g. '2 running', '4 not in summary.csv') of the sweep
    in `root` (at `batch_size`, else all): neither done nor diverged, or in spec.json's grid and absent
    from summary.csv (an interrupted sweep lists only its finished populations)."""
    rows = load_summary(root) if (Path(root) / "summary.csv").is_file() else []
    if batch_size is not None:
        rows = [r for r in rows if _bs(r.get("batch_size")) == _bs(batch_size)]
    missing, absent, why = _missing(rows, Path(root), batch_size)
    return missing, len(rows) + absent, why


def _check_finished(rows: list[dict], root: Path, batch_size: str | int | None) -> None:
    """Refuse a sweep with members neither done nor diverged (`unfinished`)."""
    missing, absent, why = _missing(rows, root, batch_size)
    if not missing:
        return
    other = batch_size is None and len(_spec(root).get("batch_sizes") or []) > 1
    raise ValueError(f"the sweep in {root} is incomplete: {missing} of {len(rows) + absent} members have not "
                     f"finished ({', '.join(why)}); rerun the `trajinv {owner(root) or 'sweep'}` command to finish them "
                     "(a diverged member counts as finished)" + ", or fit one finished batch size with --batch-size B" * other)


def _missing(rows: list[dict], root: Path, batch_size: str | int | None) -> tuple[int, int, list[str]]:
    """(unfinished members, of them absent from summary.csv, why) among `rows` and spec.json's grid."""
    unended: dict[str, int] = {}
    for r in rows:
        if r.get("status") not in ("done", "diverged"):
            unended[str(r.get("status"))] = unended.get(str(r.get("status")), 0) + 1
    spec = _spec(root)
    sizes = [_bs(b) for b in spec.get("batch_sizes") or []]
    if batch_size is not None:
        sizes = [b for b in sizes if b == _bs(batch_size)]
    try:
        grid = _grid_members(spec)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{root / 'spec.json'} is not a sweep spec (its lrs, wds, elrs or points)") from None
    absent = sum(len(grid - {_key(r["lr"], r["wd"]) for r in rows if _bs(r.get("batch_size")) == b}) for b in sizes)
    why = [f"{n} {status}" for status, n in unended.items()] + [f"{absent} not in summary.csv"] * (absent > 0)
    return absent + sum(unended.values()), absent, why


def _spec(root: Path, name: str = SWEEP_SPEC) -> dict:
    """A sweep's spec.json, or a tune's `name` ({} when it has none: then summary.csv alone says what is
    missing)."""
    path = root / name
    if not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is not a spec (a JSON object)")
    return spec


def final_val_loss_se(root: str | Path) -> dict[tuple[str, int], float]:
    """The last logged `val_loss_se` of each (run_id, member) of a sweep (empty when none was logged)."""
    return {k: se for k, (se, _) in final_val_loss_stats(root).items()}


def final_val_loss_stats(root: str | Path) -> dict[tuple[str, int], tuple[float, tuple[float, ...]]]:
    """(se, boot) of the last logged validation loss of each (run_id, member) of a sweep: its `val_loss_se`
    and its `val_loss_boot` resample means (empty when not logged). The resamples are the same window index
    sets for every member of every run on the same validation set (`trajinv.data.bootstrap`), so two
    members' boots are paired: the std of their difference is the noise of a difference of their losses."""
    stats: dict[tuple[str, int], tuple[float, tuple[float, ...]]] = {}
    if not any(Path(root).glob(f"runs/*/{METRICS}")):
        return stats
    for rec in load_metrics(root):
        v = rec.get("val_loss_se")
        if v is not None and rec.get("val_loss") is not None and math.isfinite(v):
            boot = rec.get("val_loss_boot") or ()
            stats[(str(rec["run_id"]), int(rec["member"]))] = (float(v), tuple(map(float, boot)))
    return stats
