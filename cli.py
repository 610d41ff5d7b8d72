"""The trajinv command line: builds configs from options and hands them to the library.

Installed as the `trajinv` console script (module trajinv._cli.cli).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

DEMO_LRS = (4e-3, 8e-3, 1.6e-2)
DEMO_WDS = (0.5, 1.0, 2.0)


def _fail_cleanly(fn):
    """Bad input becomes one line on stderr and exit code 1; nothing written is lost."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


def _common(fn):
    """Options shared by train and sweep."""
    options = [
        click.option("--preset", default="tiny", show_default=True, help="Model preset: tiny, small, gpt-164m."),
        click.option("--steps", default=800, show_default=True, type=int, help="Optimizer steps per run."),
        click.option("--micro-batch", default=0, show_default=True, type=int,
                     help="Largest micro-batch per forward/backward (gradient accumulation); 0 = whole batch."),
        click.option("--schedule", default="constant", show_default=True,
                     type=click.Choice(["constant", "cosine", "wsd"]), help="Learning-rate schedule."),
        click.option("--warmup", default=50, show_default=True, type=int, help="Linear warmup steps."),
        click.option("--decay-fraction", default=0.2, show_default=True, type=float,
                     help="WSD: fraction of the run spent decaying."),
        click.option("--optimizer", default="fused", show_default=True, type=click.Choice(["fused", "torch"]),
                     help="Fused Triton AdamW (CPU path on CPU) or torch.optim.AdamW."),
        click.option("--decay-mode", default="torch", show_default=True, type=click.Choice(["torch", "independent"]),
                     help="torch: p *= 1 - lr*wd; independent: p *= 1 - wd*schedule."),
        click.option("--beta1", default=0.9, show_default=True, type=float),
        click.option("--beta2", default=0.95, show_default=True, type=float),
        click.option("--clip", default=1.0, show_default=True, type=float, help="Per-member grad-norm clip; 0 = off."),
        click.option("--eval-every", default=50, show_default=True, type=int, help="Validation every N steps."),
        click.option("--eval-seqs", default=512, show_default=True, type=int, help="Validation sequences."),
        click.option("--log-every", default=10, show_default=True, type=int, help="Metrics line every N steps."),
        click.option("--checkpoint-every", default=200, show_default=True, type=int,
                     help="Checkpoint every N steps (and at the end)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Init and batch-order seed."),
        click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"])),
        click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
                     help="bf16 = autocast; weights and optimizer state stay fp32."),
        click.option("--kernels", default="auto", show_default=True, type=click.Choice(["auto", "triton", "torch"]),
                     help="Optimizer/GNS kernel backend: auto = Triton on CUDA, CPU paths on CPU."),
        click.option("--data", default="stdlib", show_default=True,
                     help="'stdlib' (embedded, offline), a .txt/.jsonl/.parquet file or folder, or hf:NAME."),
        click.option("--tokenizer", default="bytes", show_default=True,
                     help="'bytes' or a tokenizers JSON file."),
        click.option("--gns", default="off", show_default=True, type=click.Choice(["off", "per-example", "micro-batch"]),
                     help="Gradient noise scale measurement."),
        click.option("--gns-every", default=1, show_default=True, type=int,
                     help="Measure the noise scale on every N-th step only (amortises its cost)."),
        click.option("--gns-warmup", default=10, show_default=True, type=int,
                     help="Steps measured with W = 1 before switching to Adam's preconditioner."),
        click.option("--gns-embeddings/--no-gns-embeddings", default=True, show_default=True,
                     help="micro-batch mode: include the token embedding."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _configs(o: dict, members=None, batch_size: str = "32"):
    from trajinv.config import Member, OptimConfig, ScheduleConfig, TrainConfig, preset
    from trajinv.data import DataConfig
    from trajinv.gns import GNSConfig

    train = TrainConfig(
        model=preset(o["preset"]),
        members=members or (Member(8e-3, 1.0),),
        steps=o["steps"], batch_size=batch_size, micro_batch=o["micro_batch"],
        optim=OptimConfig(name=o["optimizer"], betas=(o["beta1"], o["beta2"]), clip=o["clip"],
                          decay_mode=o["decay_mode"]),
        schedule=ScheduleConfig(kind=o["schedule"], warmup=o["warmup"], decay_fraction=o["decay_fraction"]),
        eval_every=o["eval_every"], eval_seqs=o["eval_seqs"], log_every=o["log_every"],
        checkpoint_every=o["checkpoint_every"], seed=o["seed"], device=o["device"], dtype=o["dtype"],
        kernels=o["kernels"],
        gns=GNSConfig(mode=o["gns"], every=o["gns_every"], precond_warmup=o["gns_warmup"],
                      embeddings=o["gns_embeddings"]),
    )
    return train, DataConfig(source=o["data"], tokenizer=o["tokenizer"], seed=o["seed"])


class _Progress:
    """A rich progress bar fed by the library's progress events."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"))
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, kind: str, **info) -> None:
        if kind == "start":
            self.task = self.bar.add_task("", total=info["total"])
        elif kind == "advance":
            self.bar.advance(self.task, info["steps"])
        elif kind == "population":
            note = "done, skipped" if info["skipped"] else f"{info['members']} members"
            self.bar.update(self.task, description=f"{info['run_id']} ({note})")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="trajinv")
def main() -> None:
    """trajinv: tune lr and weight decay along the trajectory-invariance direction."""


@main.command()
@_common
@click.option("--lr", "lrs", multiple=True, type=float, default=(8e-3,), show_default=True,
              help="Peak lr of a member; repeat with --wd for several members.")
@click.option("--wd", "wds", multiple=True, type=float, default=(1.0,), show_default=True,
              help="Weight decay of a member (paired with --lr in order).")
@click.option("--batch-size", default="32", show_default=True, help="Batch size or schedule like '8@0.2,32'.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(file_okay=False),
              help="Run directory: metrics.jsonl, checkpoints, summary.csv.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@_fail_cleanly
def train(lrs, wds, batch_size, out, resume, **o):
    """Train one population: one member per (--lr, --wd) pair."""
    from trajinv.config import Member
    from trajinv.data import load_data
    from trajinv.sweep import write_summary, summary_rows
    from trajinv.train import Trainer

    if len(lrs) != len(wds):
        raise ValueError(f"--lr given {len(lrs)} times but --wd {len(wds)} times; pair them")
    cfg, data_cfg = _configs(o, tuple(Member(lr, wd) for lr, wd in zip(lrs, wds)), batch_size)
    trainer = Trainer(cfg, load_data(data_cfg), out, run_id=Path(out).name)
    if trainer.has_checkpoint() and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if resume and not trainer.resume():
        click.echo(f"no checkpoint in {out}; starting from step 0", err=True)
    with _Progress("train") as bar:
        bar("start", total=cfg.steps)
        bar("advance", steps=trainer.step)
        results = trainer.train(progress=lambda step: bar("advance", steps=1))
    write_summary(Path(out), summary_rows(Path(out).name, cfg, results))
    for r in results:
        click.echo(f"{r.name:24s} {r.status:9s} train {r.train_loss}  val {r.val_loss}")


@main.command()
@_common
@click.option("--lr", "lrs", multiple=True, type=float, help=f"Grid learning rates [default: {DEMO_LRS}].")
@click.option("--lr-log2", default=None, help="Learning rates as a log2 range LO:HI[:STEP], e.g. -12:-8.")
@click.option("--wd", "wds", multiple=True, type=float, help=f"Grid weight decays [default: {DEMO_WDS}].")
@click.option("--wd-log2", default=None, help="Weight decays as a log2 range LO:HI[:STEP].")
@click.option("--elr", "elrs", multiple=True, type=float,
              help="Iso-ELR lines: one member per --lr with wd = elr/lr.")
@click.option("--batch-size", "batch_sizes", multiple=True, default=("32",), show_default=True,
              help="Batch sizes or schedules; each trains as its own population.")
@click.option("--population", default=0, show_default=True, type=int,
              help="Most members trained together; 0 = all of a batch size.")
@click.option("--out", default="runs/sweep", show_default=True, type=click.Path(file_okay=False),
              help="Sweep directory; rerunning the same command resumes it.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write plots and print the analysis.")
@_fail_cleanly
def sweep(lrs, lr_log2, wds, wd_log2, elrs, batch_sizes, population, out, plots, **o):
    """Sweep lr x wd (x batch size); the defaults are the CPU demo (iso-LR and iso-ELR groups)."""
    from trajinv.sweep import SweepSpec, log2_range, run_sweep

    lrs = tuple(lrs) + (log2_range(lr_log2) if lr_log2 else ())
    wds = tuple(wds) + (log2_range(wd_log2) if wd_log2 else ())
    if not lrs and not wds and not elrs:
        lrs, wds = DEMO_LRS, DEMO_WDS
    train_cfg, data_cfg = _configs(o)
    spec = SweepSpec(train=train_cfg, data=data_cfg, lrs=lrs, wds=wds, elrs=tuple(elrs),
                     batch_sizes=tuple(batch_sizes), population=population)
    with _Progress("sweep") as bar:
        rows = run_sweep(spec, out, progress=bar)
    click.echo(f"{len(rows)} members -> {Path(out) / 'summary.csv'}")
    if plots:
        _report(Path(out))


def _report(out: Path) -> None:
    from trajinv.analyze import analyze_sweep
    from trajinv.plots import plot_sweep

    click.echo(analyze_sweep(out).format())
    for path in plot_sweep(out):
        click.echo(f"plot: {path}")


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@_fail_cleanly
def analyze(sweep_dir):
    """Print the LR-vs-ELR invariance summary of a sweep and write its plots."""
    _report(Path(sweep_dir))


if __name__ == "__main__":
    main()
