"""The trajinv command line: builds configs from options and hands them to the library.

The `trajinv` console script, `python -m trajinv` and the checkout's top-level
``cli.py`` all run `main`. Every option that sets a config field takes its
default, type, choices and help text from that field (`trajinv.config`,
`SweepSpec`, `SearchConfig`), so the defaults have one source (the sweep's demo
grid: `trajinv.sweep.DEMO_LRS`/`DEMO_WDS`); the commands hold no logic.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import click


def _abort(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while the imports below load torch (seconds): click's own "Aborted!" and exit code 1, as a
    Ctrl-C inside a command gets, not a KeyboardInterrupt traceback from deep inside torch. os._exit, not
    an exception: the interpreter may be half way through an import, which an exception unwinds into
    that traceback (or a library's bare `except:` around an optional import swallows)."""
    os.write(2, b"\nAborted!\n")  # not click.echo: the signal may land in the middle of another write to stderr
    os._exit(1)


@contextlib.contextmanager
def _interrupt_aborts() -> Iterator[None]:
    """`_abort` on SIGINT inside the block, then the handler before it again. Only over Python's own
    handler: a program that imports this module with a handler of its own (or SIGINT ignored) keeps it,
    and only in the main thread, the one that may set a handler."""
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, _abort) if ours else None
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


# The slow imports of every command happen here, when `trajinv` loads this module, before click's own
# Ctrl-C handling starts (trajinv.config imports torch); a command's own imports run under click's.
with _interrupt_aborts():
    from trajinv.config import (
        DEFAULT_PRESET,
        PRESETS,
        DataConfig,
        GNSConfig,
        Member,
        ModelConfig,
        OptimConfig,
        ScheduleConfig,
        TrainConfig,
        choices,
        default,
        field_doc,
    )
    from trajinv.parallel.options import scale_kwargs, scale_options
    from trajinv.sweep import DEMO_LRS, DEMO_WDS, SweepSpec
    from trajinv.tune.runner import TuneSpec
    from trajinv.tune.search import SearchConfig


def _one_line(e: BaseException) -> str:
    """The first line of an error's message, naming the path for an OSError."""
    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or type(e).__name__
        paths = " -> ".join(repr(str(p)) for p in (e.filename, e.filename2) if p is not None)
        return f"{what}: {paths}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _OutDir(click.Path):
    """A directory to write into; '' is refused (it wrote a whole run into the current directory)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        if value == "":
            self.fail(f"{value!r} is not a directory name (use '.' for the current directory)", param, ctx)
        return super().convert(value, param, ctx)


def _fail_cleanly(fn):
    """Bad input, a file system that refuses (permission, read-only, full disk), and a population
    too large for its device (trajinv.train.DeviceOutOfMemory) become one line on stderr and exit
    code 1; nothing already written is lost (README: What survives what)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, OverflowError, MemoryError) as e:
            raise click.ClickException(_one_line(e)) from None

    return wrapper


def field_option(cls: type, name: str, *decls: str, param: str | None = None, **overrides):
    """A click option for field `name` of config dataclass `cls`: default, type, choices and
    help come from the field (`overrides` for what differs, e.g. one element of a tuple field).
    `decls` default to --the-field-name; the command receives it as `param` (default: the
    first option name, --gns-every -> gns_every)."""
    dashed = name.replace("_", "-")
    kw = {"default": default(cls, name), "show_default": True, "help": field_doc(cls, name).split("\n\n")[0]}
    allowed = choices(cls, name)
    if allowed:
        kw["type"] = click.Choice(list(allowed))
    elif isinstance(kw["default"], bool):
        decls = decls or (f"--{dashed}/--no-{dashed}",)
    elif isinstance(kw["default"], (int, float)):
        kw["type"] = type(kw["default"])
    kw.update(overrides)
    decls = decls or (f"--{dashed}",)
    param = param or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return click.option(*decls, param, **kw)


def _kernels_choice() -> click.Choice:
    from trajinv.kernels.backend import ALIASES

    return click.Choice(list(choices(TrainConfig, "kernels")) + list(ALIASES))


# Options shared by train, sweep and tune: (dataclass, field, option names, overrides).
_COMMON = [
    (ModelConfig, None, ("--preset",), dict(default=DEFAULT_PRESET, type=click.Choice(list(PRESETS)),
                                            help="Model preset.")),
    (TrainConfig, "steps", (), {}),
    (TrainConfig, "tokens", (), dict(type=int)),
    (TrainConfig, "micro_batch", (), {}),
    (ScheduleConfig, "kind", ("--schedule",), {}),
    (ScheduleConfig, "warmup", (), {}),
    (ScheduleConfig, "decay_fraction", (), {}),
    (OptimConfig, "name", ("--optimizer",), {}),
    (OptimConfig, "decay_mode", (), {}),
    (OptimConfig, "betas", ("--beta1",), dict(default=default(OptimConfig, "betas")[0], type=float,
                                              help="Adam first-moment decay rate.")),
    (OptimConfig, "betas", ("--beta2",), dict(default=default(OptimConfig, "betas")[1], type=float,
                                              help="Adam second-moment decay rate.")),
    (OptimConfig, "clip", (), {}),
    (TrainConfig, "eval_every", (), {}),
    (TrainConfig, "eval_seqs", (), {}),
    (TrainConfig, "eval_boot", (), {}),
    (TrainConfig, "log_every", (), {}),
    (TrainConfig, "checkpoint_every", (), {}),
    (TrainConfig, "keep_checkpoints", (), {}),
    (TrainConfig, "seed", (), {}),
    (TrainConfig, "device", (), {}),
    (TrainConfig, "dtype", (), {}),
    (TrainConfig, "kernels", (), dict(type=_kernels_choice())),
    (DataConfig, "source", ("--data",), {}),
    (DataConfig, "tokenizer", (), {}),
    (DataConfig, "text_field", (), {}),
    (DataConfig, "max_tokens", (), dict(type=click.IntRange(min=2))),
    (GNSConfig, "mode", ("--gns",), {}),
    (GNSConfig, "every", ("--gns-every",), {}),
    (GNSConfig, "precond_warmup", ("--gns-warmup",), {}),
    (GNSConfig, "embeddings", ("--gns-embeddings/--no-gns-embeddings",), {}),
]


def _common_with(helps: dict[str, str]):
    """Options shared by train, sweep and tune, with a command's own help for some (by field name)."""
    def decorate(fn):
        for cls, name, decls, overrides in reversed(_COMMON):
            if name in helps:
                overrides = dict(overrides, help=helps[name])
            opt = (click.option(*decls, show_default=True, **overrides) if name is None
                   else field_option(cls, name, *decls, **overrides))
            fn = opt(fn)
        return fn
    return decorate


_common = _common_with({})
_TUNE_HELPS = {  # what TuneSpec.stage_train makes of them: the tune measures B_precond in every stage
    "mode": "Not used: every stage measures micro-batch GNS (B_precond decides the regime); kept in the "
            "tune's spec, so a rerun must repeat it.",
    "micro_batch": "Micro-batch of the stages' GNS: used when it splits every batch into 2 or more; "
                   "0 or otherwise: the tune picks one (a quarter of the batch where it can).",
}


def _configs(o: dict, members: tuple[Member, ...] | None = None, batch_size: str | None = None
             ) -> tuple[TrainConfig, DataConfig]:
    from trajinv.config import preset

    train = TrainConfig(
        model=preset(o["preset"]),
        members=members or default(TrainConfig, "members"),
        steps=o["steps"], tokens=o["tokens"],
        batch_size=default(TrainConfig, "batch_size") if batch_size is None else batch_size,
        micro_batch=o["micro_batch"],
        optim=OptimConfig(name=o["optimizer"], betas=(o["beta1"], o["beta2"]), clip=o["clip"],
                          decay_mode=o["decay_mode"]),
        schedule=ScheduleConfig(kind=o["schedule"], warmup=o["warmup"], decay_fraction=o["decay_fraction"]),
        eval_every=o["eval_every"], eval_seqs=o["eval_seqs"], eval_boot=o["eval_boot"], log_every=o["log_every"],
        checkpoint_every=o["checkpoint_every"], keep_checkpoints=o["keep_checkpoints"], seed=o["seed"],
        device=o["device"], dtype=o["dtype"],
        kernels=o["kernels"],
        gns=GNSConfig(mode=o["gns"], every=o["gns_every"], precond_warmup=o["gns_warmup"],
                      embeddings=o["gns_embeddings"]),
    )
    return train, DataConfig(source=o["data"], tokenizer=o["tokenizer"], text_field=o["text_field"], seed=o["seed"],
                             max_tokens=o["max_tokens"])


def _check_steps_and_tokens(o: dict, train: TrainConfig, batch_sizes) -> None:
    """--tokens decides the length; a --steps also on the command line must agree with it for
    every batch size (a default --steps is not a request)."""
    from dataclasses import replace

    ctx = click.get_current_context(silent=True)
    given = ctx is not None and ctx.get_parameter_source("steps") not in (None, click.core.ParameterSource.DEFAULT)
    if o["tokens"] is None or not given:
        return
    for bs in batch_sizes:
        derived = replace(train, batch_size=bs).steps
        if derived != o["steps"]:
            raise ValueError(f"--steps {o['steps']} disagrees with --tokens {o['tokens']}: batch size {bs!r} "
                             f"makes that {derived} steps; give one of them")


class _Progress:
    """A rich progress bar fed by the library's progress events.

    `warnings` (TrainConfig.warnings()) print on stderr when the work starts: after every check of the
    command, its data and its directory, so that a refused command still says one line. A tune's bars
    are labelled by stage ("tune 1-scan", "tune 2-zoom"): each stage has a bar of its own."""

    def __init__(self, label: str, warnings: Sequence[str] = ()):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.fields[label]}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.description}"))
        self.label = self.stage_label = label
        self.task = None
        self.warnings = list(warnings)
        self.said: set[str] = set()  # a tune's stages each start with the same data warning: printed once

    def __enter__(self):
        return self  # the bar shows from "start": a command refused before then prints its one line only

    def __exit__(self, *exc):
        return self.task is not None and self.bar.__exit__(*exc)  # no bar shown: the exception goes on

    def __call__(self, kind: str, **info) -> None:
        if kind == "start":
            for line in [*self.warnings, *info.get("warnings", ())]:  # the config's, then the data's
                if line not in self.said:
                    click.echo(f"warning: {line}", err=True)
                    self.said.add(line)
            self.warnings = []
            if self.task is None:
                self.bar.__enter__()
            self.task = self.bar.add_task("", total=info["total"], label=self.stage_label)  # a tune: one per stage
        elif kind == "advance":
            self.bar.advance(self.task, info["steps"])
        elif kind == "stage":  # a tune's, before the stage's sweep starts: its bar names the stage
            self.stage_label = f"{self.label} {info['name']}"
        elif kind == "population":
            n = info["members"]
            note = "done, skipped" if info["skipped"] else f"{n} member{'s' * (n != 1)}"
            self.bar.update(self.task, description=f"{info['run_id']} ({note})")
        elif kind == "failed":  # scale-out: a population failed, the others go on
            from rich.markup import escape

            # soft_wrap: one line, as every error here (rich wrapped it at 80 columns off a terminal)
            self.bar.console.print(f"[red]{escape(info['run_id'])} failed:[/red] {escape(info['error'])}",
                                   soft_wrap=True)


class _UsageError(click.ClickException):
    exit_code = 1


# click >= 8.2 shows the help for a bare `trajinv` through this UsageError: leave it alone
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """click's group, except that a usage error (an unknown option, a value of the wrong type or
    outside the choices) is one line on stderr and exit code 1, like every other bad input."""

    @staticmethod
    def _one_line(e: click.UsageError) -> _UsageError:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        return _UsageError(e.format_message().strip().replace("\n", " ") + hint)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _NO_ARGS_HELP:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _NO_ARGS_HELP:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="trajinv")
def main() -> None:
    """trajinv: tune lr and weight decay along the trajectory-invariance direction."""


@main.command()
@_common
@field_option(Member, "lr", param="lrs", multiple=True, default=(default(Member, "lr"),),
              help="Peak lr of a member; repeat with --wd for several members.")
@field_option(Member, "wd", param="wds", multiple=True, default=(default(Member, "wd"),),
              help="Weight decay of a member (paired with --lr in order).")
@field_option(TrainConfig, "batch_size")
@click.option("--out", default="runs/train", show_default=True, type=_OutDir(),
              help="Run directory: metrics.jsonl, checkpoints, summary.csv.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@_fail_cleanly
def train(lrs, wds, batch_size, out, resume, **o):
    """Train one population: one member per (--lr, --wd) pair."""
    from trajinv.parallel import ddp
    from trajinv.rundirs import hold
    from trajinv.sweep import summary_rows, write_summary
    from trajinv.train import Trainer, data_warnings

    if len(lrs) != len(wds):
        raise ValueError(f"--lr given {len(lrs)} times but --wd {len(wds)} times; pair them")
    cfg, data_cfg = _configs(o, tuple(Member(lr, wd) for lr, wd in zip(lrs, wds)), batch_size)
    cfg.validate()  # before the data loads: a bad value fails fast
    _check_steps_and_tokens(o, cfg, (batch_size,))
    dist, data = ddp.setup(cfg, data_cfg)  # under torchrun: one population over the ranks; rank 0 writes
    trainer = Trainer(cfg, data, out, run_id=Path(out).resolve().name, dist=dist)  # `--out .` has a name too
    with contextlib.ExitStack() as held:
        if dist.is_main:  # a second train into the run (say --resume twice) would rewrite its files under it
            Path(out).mkdir(parents=True, exist_ok=True)  # the checks passed: a run starts here
            hold(out, held)
        if trainer.has_checkpoint() and not resume:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
        if resume:
            resumed = trainer.resume()
            if dist.is_main:
                click.echo(f"resuming {out} from step {trainer.step}" if resumed
                           else f"no checkpoint in {out}; starting from step 0", err=True)
        quiet = contextlib.nullcontext(lambda kind, **info: None)
        with _Progress("train", cfg.warnings() + data_warnings(trainer.cfg, data)) if dist.is_main else quiet as bar:
            bar("start", total=cfg.steps)
            bar("advance", steps=trainer.step)
            results = trainer.train(progress=lambda step: bar("advance", steps=1))
        dist.close()
        if not dist.is_main:
            return
        write_summary(Path(out), summary_rows(trainer.run_id, cfg, results))
    loss = lambda v: "-" if v is None else f"{v:.4f}"  # the summary keeps every digit
    for r in results:
        click.echo(f"{r.name:24s} {r.status:9s} train {loss(r.train_loss)}  val {loss(r.val_loss)}")


@main.command()
@_common
@click.option("--lr", "lrs", multiple=True, type=float, help=f"Grid learning rates [default: {DEMO_LRS}].")
@click.option("--lr-log2", default=None, help="Learning rates as a log2 range LO:HI[:STEP], e.g. -12:-8.")
@click.option("--wd", "wds", multiple=True, type=float,
              help=f"Grid weight decays [default: {DEMO_WDS}, unless --elr lines are given].")
@click.option("--wd-log2", default=None, help="Weight decays as a log2 range LO:HI[:STEP].")
@click.option("--elr", "elrs", multiple=True, type=float,
              help="Iso-ELR lines: one member per --lr with wd = elr/lr (wd = elr with --decay-mode independent).")
@click.option("--batch-size", "batch_sizes", multiple=True, default=(default(TrainConfig, "batch_size"),),
              show_default=True, help="Batch sizes or schedules; each trains as its own population.")
@field_option(SweepSpec, "population")
@click.option("--out", default="runs/sweep", show_default=True, type=_OutDir(),
              help="Sweep directory; rerunning the same command resumes it.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write plots and print the analysis.")
@scale_options
@click.option("--x", "x", default="step", show_default=True, type=click.Choice(["step", "tokens"]),
              help="Axis of the analysis and plots: steps, or tokens trained (batch sizes compared at equal data).")
@_fail_cleanly
def sweep(lrs, lr_log2, wds, wd_log2, elrs, batch_sizes, population, out, plots, x, **o):
    """Sweep lr x wd (x batch size); the defaults are the CPU demo (iso-LR and iso-ELR groups)."""
    from trajinv.parallel.runner import failures
    from trajinv.sweep import default_axes, distinct_batch_sizes, log2_range, run_sweep

    scale = scale_kwargs(o)
    batch_sizes = distinct_batch_sizes(batch_sizes)  # as a repeated --lr: `--batch-size 4 --batch-size 4` is one

    lrs, wds = default_axes(tuple(lrs) + (log2_range(lr_log2) if lr_log2 else ()),
                            tuple(wds) + (log2_range(wd_log2) if wd_log2 else ()), elrs)
    train_cfg, data_cfg = _configs(o)
    _check_steps_and_tokens(o, train_cfg, batch_sizes)
    spec = SweepSpec(train=train_cfg, data=data_cfg, lrs=lrs, wds=wds, elrs=tuple(elrs),
                     batch_sizes=tuple(batch_sizes), population=population)
    # each population's own: with --tokens a batch size sets the step count the warnings judge
    warnings = dict.fromkeys(w for _, cfg in spec.populations() for w in cfg.warnings())
    with _Progress("sweep", warnings) as bar:
        rows = run_sweep(spec, out, progress=bar, **scale)
    click.echo(f"{len(rows)} member{'s' if len(rows) != 1 else ''} -> {Path(out) / 'summary.csv'}")
    failed = failures(rows)
    if failed:
        raise ValueError(f"{len(failed)} population(s) failed ({', '.join(failed)}; errors in summary.csv); "
                         "rerun the same command to retry them")
    if plots:
        _report(Path(out), x)


@main.command()
@_common_with(_TUNE_HELPS)
@field_option(TrainConfig, "batch_size", param="batch_sizes", multiple=True,
              default=(default(TrainConfig, "batch_size"),),
              help="Batch size, or a batch-size schedule ('8@0.2,32'); one: a tune searches one setting.")
@field_option(SearchConfig, "lr")
@field_option(SearchConfig, "center", "--center-elr", type=float,
              help="Centre of the first ELR scan; default: lr x the default member's wd.")
@field_option(SearchConfig, "octaves")
@field_option(SearchConfig, "points")
@field_option(SearchConfig, "zoom_points")
@field_option(SearchConfig, "zoom_width")
@field_option(SearchConfig, "max_shifts")
@field_option(SearchConfig, "max_rescans")
@field_option(SearchConfig, "check_factors", "--check-factor", multiple=True, type=float)
@field_option(SearchConfig, "noise")
@field_option(SearchConfig, "budget", type=int, help="Total member-steps of the tune (omit: no bound).")
@field_option(TuneSpec, "min_transitions")
@field_option(TuneSpec, "population")
@scale_options
@click.option("--out", default="runs/tune", show_default=True, type=_OutDir(),
              help="Tune directory (a sweep directory per stage); rerunning the same command resumes it.")
@_fail_cleanly
def tune(batch_sizes, lr, center_elr, octaves, points, zoom_points, zoom_width, max_shifts, max_rescans, check_factor,
         noise, budget, min_transitions, population, out, **o):
    """Find lr and wd along the salient direction (ELR late in small-batch training, else lr)."""
    from trajinv.sweep import distinct_batch_sizes
    from trajinv.tune.report import format_summary, write_report
    from trajinv.tune.runner import check_decay_mode, run_tune

    batch_sizes = distinct_batch_sizes(batch_sizes)  # a repeat of one is that one, as for sweep
    if len(batch_sizes) > 1:  # click kept the last of a repeated option without a word
        raise ValueError(f"--batch-size given {len(batch_sizes)} times ({', '.join(batch_sizes)}): a tune searches "
                         "one batch size or schedule; tune each into its own --out")
    batch_size = batch_sizes[0]
    scale = scale_kwargs(o)
    train_cfg, data_cfg = _configs(o, batch_size=batch_size)
    _check_steps_and_tokens(o, train_cfg, (batch_size,))
    check_decay_mode(train_cfg)  # before the placeholder member's lr*wd is read as an independent decay
    train_cfg.validate()  # first: a bad --steps is named as such, not as the search's steps_per_member
    search = SearchConfig(lr=lr, center=center_elr, octaves=octaves, points=points, zoom_points=zoom_points,
                          zoom_width=zoom_width, max_shifts=max_shifts, max_rescans=max_rescans,
                          check_factors=tuple(check_factor), noise=noise, budget=budget,
                          steps_per_member=train_cfg.steps)
    spec = TuneSpec(train=train_cfg, data=data_cfg, search=search, population=population,
                    min_transitions=min_transitions)
    with _Progress("tune", spec.stage_train().warnings()) as bar:  # what the stages train
        run = run_tune(spec, out, progress=bar, **scale)
    paths = write_report(run, Path(out))
    click.echo(format_summary(run))
    for path in paths:
        click.echo(f"wrote: {path}")


@main.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--target-tokens", type=float, default=None, help="Predict the optimal lr, wd and ELR at this budget.")
@click.option("--out", default="runs/fit", show_default=True, type=_OutDir(),
              help="Where scaling.json and scaling.png go.")
@click.option("--batch-size", default=None, help="Fit only the members of this batch size or schedule "
              "(a sweep that trained several must be told which).")
@_fail_cleanly
def fit(dirs, target_tokens, out, batch_size):
    """Fit the optimal lr, wd and ELR against tokens across tunes or sweeps at >= 3 budgets."""
    from trajinv.analysis.budgets import fit_directories, write_scaling

    report = fit_directories(dirs, target_tokens=target_tokens, batch_size=batch_size)
    click.echo(report.format())
    for path in write_scaling(report, out):
        click.echo(f"wrote: {path}")


def _report(out: Path, x: str = "step") -> None:
    from trajinv.analysis.report import sweep_report

    text, paths = sweep_report(out, x=x)
    click.echo(text)
    for path in paths:
        click.echo(f"plot: {path}")


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--x", "x", default="step", show_default=True, type=click.Choice(["step", "tokens"]),
              help="Axis of the analysis and plots: steps, or tokens trained (batch sizes compared at equal data).")
@_fail_cleanly
def analyze(sweep_dir, x):
    """Print the LR-vs-ELR invariance summary of a sweep and write its plots."""
    _report(Path(sweep_dir), x)


if __name__ == "__main__":
    main()
