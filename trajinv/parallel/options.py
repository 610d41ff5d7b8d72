"""The scale-out options of the commands that run sweeps (`sweep`, and `tune` on top of `run_sweep`).

`@scale_options` adds `--devices`, `--ray` and `--ray-cpus`; `scale_kwargs(o)` takes them out of
the command's options as keyword arguments for `run_sweep(spec, out, ..., **scale_kwargs(o))`.
"""

from __future__ import annotations

import click

_OPTIONS = [
    click.option("--devices", default=None, metavar="LIST",
                 help="Train populations concurrently, one worker process per entry: cpu,cpu (each worker "
                      "gets its share of the cores), cuda:0,cuda:1, or all (every GPU). Sets the device kind."),
    click.option("--ray", "ray", default=None, metavar="ADDRESS",
                 help="Run each population as a Ray task: auto (the running cluster), local (a new one-node "
                      "instance) or the head's address. --out must be on storage every node sees."),
    click.option("--ray-cpus", default=1, show_default=True, type=int,
                 help="CPUs per Ray task when training on CPU (a CUDA task asks for one GPU and one CPU)."),
]


def scale_options(fn):
    """Add --devices, --ray and --ray-cpus to a click command."""
    for opt in reversed(_OPTIONS):
        fn = opt(fn)
    return fn


def scale_kwargs(o: dict) -> dict:
    """Pop the scale-out options from a command's options: keyword arguments of `run_sweep`."""
    return {"devices": o.pop("devices"), "ray": o.pop("ray"), "ray_cpus": o.pop("ray_cpus")}
