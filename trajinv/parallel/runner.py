"""A sweep's populations trained concurrently: on this node's devices, or as Ray tasks.

`trajinv.sweep.run_sweep(spec, out, devices=..., ray=...)` hands over to
`run_scaled`, which does what the sequential loop does, with a backend in place
of the loop: size the populations (to fit memory and, without `--population`, spread
over the workers: `memory.spread_size`), check the sweep directory, tokenize once in
the parent (workers only open the cache), then give every population to the
backend (`pool.LocalPool` or `cluster.RayCluster`) and collect the results.

summary.csv is rewritten after each population finishes, rows always in spec
order whatever order they finish in (a population still running has no rows yet).
A failed population gets one row per member with status `failed` and its error
in an `error` column; a rerun resumes only what is not finished (finished
populations are read back here from their last checkpoint's sidecar, with no
worker started for them; failed and unfinished ones resume from their checkpoint).
On CPU the numbers equal a sequential sweep's bit for bit: a population's
trajectory depends only on its config, not on where or beside what it runs (the
native kernels give the same sums for any thread count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from trajinv.parallel.devices import device_kind, usable_devices
from trajinv.parallel.memory import size_populations
from trajinv.parallel.worker import Job, Outcome, run_job


def check_scale(devices: str | Sequence[str] | None, ray: str | None, ray_cpus: int = 1, device: str = "cpu") -> None:
    """The scale-out options' own checks, made before anything is written (`run_scaled` makes them first;
    the tune before its spec): one of `devices` or `ray`, usable devices that agree with a `device` other
    than the default (--devices names the kind; `--device cuda --devices cpu,cpu` trained on CPU without a
    word), and for Ray: installed, `ray_cpus` >= 1 and an address that answers."""
    if (devices is None) == (ray is None):
        raise ValueError("give --devices or --ray, not both" if devices is not None else "give --devices or --ray")
    if devices is not None:
        kind = device_kind(usable_devices(devices))
        if device != "cpu" and device != kind:
            listed = devices if isinstance(devices, str) else ",".join(devices)
            raise ValueError(f"--device {device} with --devices {listed} ({kind}): --devices names the devices "
                             "to train on; leave out --device or list devices of that kind")
        return
    from trajinv.parallel.cluster import check_reachable, import_ray

    if isinstance(ray_cpus, bool) or not isinstance(ray_cpus, int) or ray_cpus < 1:
        raise ValueError(f"--ray-cpus must be >= 1, got {ray_cpus!r}")
    if not ray.strip():  # Ray's own word for it, "Invalid address format:", names no option and no value
        raise ValueError(f"--ray {ray!r} is empty; give auto, local or the head's address (host:port)")
    import_ray()
    if ray not in ("auto", "local"):
        check_reachable(ray)


def run_scaled(spec, out: str | Path, progress: Callable | None = None, devices: str | Sequence[str] | None = None,
               ray: str | None = None, ray_cpus: int = 1, task=run_job) -> list[dict]:
    """Train `spec`'s populations into `out` on `devices` (one worker each) or on the Ray cluster at
    `ray` ('auto', 'local' or an address; `ray_cpus` CPUs per task on CPU); returns the summary rows.

    Progress events are those of `run_sweep`, plus ('failed', run_id=..., error=...).
    `task` is the function a worker runs per population (tests swap it to make one fail).
    """
    from trajinv.sweep import finished_rows, prepare_sweep, start_warnings, write_summary

    check_scale(devices, ray, ray_cpus, spec.train.device)
    spec.validate()
    out = Path(out)
    notify = progress or (lambda kind, **info: None)
    if devices is not None:
        devices = usable_devices(devices)
        kind = device_kind(devices)
        spec = replace(spec, train=replace(spec.train, device=kind))  # --devices names the device kind
        from trajinv.parallel.pool import LocalPool

        backend = LocalPool(devices)
    else:
        from trajinv.parallel.cluster import RayCluster

        kind = spec.train.device
        backend = RayCluster(ray, out, cpus=ray_cpus, gpu=kind == "cuda")
    with backend, ExitStack() as held:  # held: `out` locked until the last population is written
        spec = size_populations(spec, out, backend.free_bytes, kind, backend.workers())
        # checked, tokenized once here (workers open the cache), `out` locked, spec written
        corpus, pops = prepare_sweep(spec, out, held)
        notify("start", total=sum(cfg.steps for _, cfg in pops), **start_warnings(pops, corpus))
        results: dict[str, Outcome] = {}

        def table() -> list[dict]:
            return [row for run_id, _ in pops if run_id in results for row in results[run_id].rows]

        for run_id, cfg in pops:  # finished before: read here, no worker started for them
            try:
                rows = finished_rows(run_id, cfg, corpus, out / "runs" / run_id, notify)
            except ValueError:  # its worker resumes it and fails it in a row, as any failure (a bad metrics line)
                rows = None
            if rows is not None:
                results[run_id] = Outcome(run_id, rows, skipped=True)
        if results:
            write_summary(out, table())
        data = backend.portable(spec.data)
        jobs = [Job(run_id, cfg, str(out / "runs" / run_id), data) for run_id, cfg in pops if run_id not in results]

        def done(outcome: Outcome) -> None:
            results[outcome.run_id] = outcome
            if outcome.error:
                notify("failed", run_id=outcome.run_id, error=outcome.error)
            write_summary(out, table())

        backend.run(jobs, notify, done, task)
    return table()


def failures(rows: Sequence[dict]) -> dict[str, str]:
    """run_id -> error of every failed population in summary rows."""
    return {r["run_id"]: r["error"] for r in rows if r.get("status") == "failed"}
