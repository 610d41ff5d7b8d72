"""The click CLI: help with defaults, a tiny train and sweep, one-line errors for bad input."""

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

_spec = importlib.util.spec_from_file_location("trajinv_cli", Path(__file__).parents[1] / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TINY = ["--steps", "3", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "1", "--checkpoint-every", "2",
        "--warmup", "1"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 400)
    return str(path)


def run(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["train"], ["sweep"], ["analyze"]])
def test_help_shows_defaults(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0
    if cmd and cmd != ["analyze"]:
        assert "[default: 800]" in res.output and "[default: tiny]" in res.output


def test_train_then_resume(corpus, tmp_path):
    out = str(tmp_path / "run")
    res = run("train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--lr", "0.02", "--wd", "0.1",
              "--out", out, "--optimizer", "torch")
    assert res.exit_code == 0, res.output
    assert "lr=0.01,wd=0.1" in res.output and (Path(out) / "summary.csv").exists()
    import re

    line = next(x for x in res.output.splitlines() if x.startswith("lr=0.01,wd=0.1"))
    assert re.fullmatch(r"lr=0\.01,wd=0\.1 +done +train \d+\.\d{4}  val \d+\.\d{4}", line), line  # not 16 digits
    again = run("train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--lr", "0.02", "--wd", "0.1",
                "--out", out, "--optimizer", "torch")
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = run("train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--lr", "0.02", "--wd", "0.1",
                  "--out", out, "--optimizer", "torch", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} from step 3" in resumed.output  # said, not silent
    fresh = run("train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--out", str(tmp_path / "new"),
                "--optimizer", "torch", "--resume")
    assert fresh.exit_code == 0 and "no checkpoint in" in fresh.output and "starting from step 0" in fresh.output


def test_a_train_into_a_run_another_command_is_training_is_refused_and_changes_nothing(corpus, tmp_path):
    # `train --resume` started twice (two shells, a resubmitted job): both rewrote metrics.jsonl and the
    # checkpoints at once
    import fcntl
    import os

    out = tmp_path / "run"
    args = ["train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--out", str(out), "--optimizer", "torch"]
    assert run(*args).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fd = os.open(out, os.O_RDONLY)  # what the other command holds while it trains
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = run(*args, "--resume")
        assert res.exit_code == 1
        assert res.output.strip().splitlines() == [f"Error: {out} is in use: another trajinv command is training "
                                                   "into it; wait for it to end or use another --out"]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        os.close(fd)
    assert run(*args, "--resume").exit_code == 0  # the lock went with the other command


def test_max_tokens_trains_on_the_start_of_the_corpus(corpus, tmp_path):
    from trajinv.checkpoint import latest_meta
    from trajinv.data import DataConfig, load_data

    out = tmp_path / "run"
    res = run("train", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--out", str(out),
              "--optimizer", "torch", "--max-tokens", "6000", "--batch-size", "4",
              "--eval-seqs", "4")  # its validation split: 4 windows
    assert res.exit_code == 0, res.output
    assert latest_meta(out)["data"]["max_tokens"] == 6000  # kept with the run: a resume on all of it is refused
    capped = load_data(DataConfig(source=corpus, max_tokens=6000))
    assert capped.train.size + capped.val.size <= 6000 < Path(corpus).stat().st_size


def test_sweep_writes_summary_and_plots(corpus, tmp_path):
    out = tmp_path / "sw"
    res = run("sweep", *TINY, "--data", corpus, "--lr", "0.01", "--lr", "0.02", "--wd", "0.5", "--elr", "0.01",
              "--batch-size", "4", "--batch-size", "04", "--out", str(out))  # a repeat is one population
    assert res.exit_code == 0, res.output
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 3 and (out / "val_loss_by_lr.png").exists()
    assert (out / "val_loss_by_elr.png").exists() and "iso-ELR" in res.output
    assert run("analyze", str(out)).exit_code == 0


@pytest.mark.parametrize("args, needle", [
    (["train", "--lr", "-0.1"], "-0.1"),
    (["train", "--preset", "huge"], "huge"),
    (["train", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["train", "--lr", "0.1", "--lr", "0.2"], "pair"),
    (["sweep", "--lr-log2", "3:1"], "3:1"),
    (["train", "--batch-size", "8@2,16"], "8@2,16"),
    (["analyze", "/no/such/sweep"], "/no/such/sweep"),
    (["train", "--gns", "micro-batch", "--gns-every", "0"], "every"),
    (["train", "--gns", "micro-batch", "--micro-batch", "5"], "micro-batch"),
    (["train", "--steps", "5", "--tokens", "4096"], "--steps 5 disagrees with --tokens 4096"),
    (["sweep", "--steps", "2", "--tokens", "4096", "--batch-size", "32", "--batch-size", "64"], "'64' makes that 1"),
    (["train", "--tokens", "0"], "tokens must be a positive integer, got 0"),
    (["analyze", "/no/such/sweep", "--x", "tokens"], "/no/such/sweep"),
])
def test_bad_input_one_line_error(args, needle, tmp_path):
    res = CliRunner().invoke(cli.main, args + ["--out", str(tmp_path / "o")] if args[0] != "analyze" else args)
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output


def test_sweep_dir_of_another_spec_keeps_its_files(corpus, tmp_path):
    out = tmp_path / "sw"
    base = ["sweep", *TINY, "--data", corpus, "--wd", "0.5", "--batch-size", "4", "--out", str(out), "--no-plots"]
    assert run(*base, "--lr", "0.01").exit_code == 0
    before = sorted(p.name for p in out.rglob("*"))
    res = CliRunner().invoke(cli.main, base + ["--lr", "0.03"])
    assert res.exit_code != 0 and "another spec" in res.output
    assert sorted(p.name for p in out.rglob("*")) == before


def test_sweep_with_gns_records_noise_scale(corpus, tmp_path):
    import csv

    out = tmp_path / "gns"
    res = run("sweep", *TINY, "--steps", "6", "--data", corpus, "--lr", "0.01", "--wd", "0.5", "--wd", "1",
              "--batch-size", "4", "--micro-batch", "2", "--gns", "micro-batch", "--gns-warmup", "2",
              "--out", str(out))
    assert res.exit_code == 0, res.output
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # a 6-step estimate may still be unresolved (empty) for a member; the columns are always there
    assert all("b_precond" in r and r["batch_regime"] in ("small", "large", "") for r in rows)
    assert any(r["b_precond"] for r in rows)
    assert (out / "gns.png").exists()


def test_sweep_at_equal_tokens_across_batch_sizes(corpus, tmp_path):
    """--tokens gives each batch size the steps that train the same tokens; --x tokens compares them there."""
    import csv

    out = tmp_path / "tok"
    args = ["--tokens", "1024", "--eval-every", "2", "--eval-seqs", "8", "--log-every", "1", "--warmup", "1",
            "--data", corpus]
    res = run("sweep", *args, "--lr", "0.01", "--wd", "0.5", "--wd", "1", "--batch-size", "4", "--batch-size", "8",
              "--x", "tokens", "--out", str(out))
    assert res.exit_code == 0, res.output
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["batch_size"], r["steps"], r["tokens"]) for r in rows} == {("4", "4", "1024"), ("8", "2", "1024")}
    assert "early (tokens" in res.output and (out / "val_loss_by_elr_tokens.png").exists()
    # A --steps that agrees with --tokens is accepted.
    agree = run("train", "--steps", "4", "--batch-size", "4", *args, "--out", str(tmp_path / "t"))
    assert agree.exit_code == 0, agree.output


@pytest.mark.parametrize("given, lrs, wds", [
    (["--lr", "0.01"], (0.01,), (0.5, 1.0, 2.0)),  # used to fail: "a sweep needs weight decays"
    (["--wd", "0.5"], (4e-3, 8e-3, 1.6e-2), (0.5,)),  # used to fail: "a sweep needs at least one lr"
    (["--elr", "0.004"], (4e-3, 8e-3, 1.6e-2), ()),  # an ELR line needs no wd
])
def test_sweep_takes_the_default_of_each_axis_left_out(given, lrs, wds, monkeypatch, tmp_path):
    seen = {}

    def fake_run_sweep(spec, out, **kw):
        seen["spec"] = spec
        return []

    monkeypatch.setattr("trajinv.sweep.run_sweep", fake_run_sweep)
    run("sweep", *given, "--out", str(tmp_path / "sw"), "--no-plots")
    assert (seen["spec"].lrs, seen["spec"].wds) == (lrs, wds)


def test_warnings_print_when_the_work_starts_and_never_beside_an_error(corpus, tmp_path):
    out = str(tmp_path / "run")
    args = ["train", "--steps", "3", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "1", "--warmup", "5",
            "--data", corpus, "--lr", "0.01", "--wd", "0.1", "--out", out]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("warning: --warmup 5 >= the run's 3 steps") == 1
    # the same command again is refused (the run exists): the error alone, not the warning above it
    again = CliRunner().invoke(cli.main, args)
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.exit_code == 1 and len(lines) == 1 and "--resume" in lines[0], again.stderr


def test_a_tune_warns_of_what_its_stages_train(corpus, tmp_path):
    # the stages measure GNS whatever --gns says: --gns-embeddings is not moot there, a too long --gns-warmup is
    res = CliRunner().invoke(cli.main, ["tune", *TINY, "--points", "3", "--octaves", "2", "--zoom-points", "0",
                                        "--max-rescans", "0", "--check-factor", "2", "--budget", "30",
                                        "--gns", "off", "--gns-embeddings", "--gns-warmup", "3", "--batch-size", "4",
                                        "--data", corpus, "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "--gns-embeddings has no effect" not in res.stderr
    assert res.stderr.count("warning: --gns-warmup 3 covers the run's 3 steps") == 1  # once, not once per stage


def test_training_more_tokens_than_the_corpus_holds_is_said_once(corpus, tmp_path):
    # the corpus holds 10,261 training tokens; 6 steps of 32 x 64 train 12,288 a member: 1.2 passes
    more = ["--steps", "6", "--eval-every", "3", "--eval-seqs", "8", "--warmup", "1", "--data", corpus]
    said = "warning: a member trains on 12,288 tokens, 1.2x the corpus's 10,261 training tokens"
    for cmd in (["train", "--lr", "1e-3", "--wd", "0.1"], ["sweep", "--lr", "1e-3", "--wd", "0.1", "--no-plots"],
                ["tune", "--points", "3", "--octaves", "2", "--zoom-points", "0", "--max-rescans", "0",
                 "--check-factor", "2", "--budget", "36"]):  # a tune: a start per stage, one warning
        res = CliRunner().invoke(cli.main, cmd + more + ["--out", str(tmp_path / cmd[0])])
        assert res.exit_code == 0, res.output
        assert res.stderr.count(said) == 1, (cmd[0], res.stderr)
    assert len(list((tmp_path / "tune" / "stages").iterdir())) >= 2
    res = CliRunner().invoke(cli.main, ["train", *TINY, "--data", corpus, "--out", str(tmp_path / "less")])
    assert res.exit_code == 0 and "corpus" not in res.stderr  # 6,144 tokens: less than one pass


def test_a_tune_refuses_two_batch_sizes_and_says_what_it_makes_of_gns_options(corpus, tmp_path):
    # click kept the last of a repeated single option: `--batch-size 32 --batch-size 256` tuned 256 silently
    res = CliRunner().invoke(cli.main, ["tune", *TINY, "--batch-size", "32", "--batch-size", "256", "--data", corpus,
                                        "--out", str(tmp_path / "t")])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "--batch-size given 2 times (32, 256)" in lines[0], res.stderr
    assert not (tmp_path / "t").exists()
    helps = run("tune", "--help").output
    assert "Not used: every stage measures micro-batch GNS" in " ".join(helps.split())
    assert "Micro-batch of the stages' GNS" in helps
    assert "Not used" not in run("sweep", "--help").output  # the shared options keep their own help elsewhere


def test_each_command_refuses_another_commands_directory(corpus, tmp_path):
    pair = ["--data", corpus, "--lr", "0.01", "--wd", "0.1"]
    made = {"train": ["train", *TINY, *pair], "sweep": ["sweep", *TINY, *pair, "--no-plots"],
            "tune": ["tune", *TINY, "--data", corpus, "--points", "3", "--octaves", "2", "--zoom-points", "0",
                     "--max-rescans", "0", "--check-factor", "2", "--budget", "9", "--batch-size", "4"]}
    held = {"train": "train run", "sweep": "sweep", "tune": "tune"}
    for kind, args in made.items():
        out = tmp_path / kind
        assert CliRunner().invoke(cli.main, args + ["--out", str(out)]).exit_code == 0
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for other, other_args in made.items():
            if other == kind:
                continue
            res = CliRunner().invoke(cli.main, other_args + ["--out", str(out)])
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            assert res.exit_code == 1 and len(lines) == 1, (kind, other, res.output)
            assert f"holds a {held[kind]} (`trajinv {kind}`), not a {other}" in lines[0]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, kind


def test_text_field_names_the_column_of_a_jsonl_corpus(tmp_path):
    import json

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"content": "def f(x):\n    return x + 1\n" * 20}) + "\n" for _ in range(40)))
    args = ["train", *TINY, "--data", str(corpus), "--lr", "0.01", "--wd", "0.1", "--eval-seqs", "4"]
    res = CliRunner().invoke(cli.main, args + ["--out", str(tmp_path / "a")])
    assert res.exit_code == 1 and "columns: content" in res.stderr and "--text-field" in res.stderr
    res = CliRunner().invoke(cli.main, args + ["--text-field", "content", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output


def test_a_population_out_of_memory_is_one_line(corpus, tmp_path, monkeypatch):
    import torch

    from trajinv.train import Trainer

    def out_of_memory(self, step, bs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity of "
                                     "139.81 GiB of which 2.00 GiB is free.\nOf the allocated memory ...")

    monkeypatch.setattr(Trainer, "_forward_backward", out_of_memory)
    res = CliRunner().invoke(cli.main, ["sweep", *TINY, "--data", corpus, "--lr", "0.01", "--wd", "0.5", "--wd", "1",
                                        "--batch-size", "4", "--out", str(tmp_path / "sw"), "--no-plots"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: bs4: 2 members ran out of cpu memory in step 1 (CUDA out of memory. Tried to allocate "
                      "9.00 GiB); train fewer members at once (--population of sweep and tune) or use a smaller "
                      "--micro-batch"], res.output


def test_progress_names_a_populations_size_in_words():
    from trajinv.cli import _Progress

    progress = _Progress("sweep")
    with progress:
        progress("start", total=2)
        progress("population", run_id="bs32-p1", skipped=False, members=1)
        one = progress.bar.tasks[0].description
        progress("population", run_id="bs32-p0", skipped=False, members=3)
        three = progress.bar.tasks[0].description
    assert (one, three) == ("bs32-p1 (1 member)", "bs32-p0 (3 members)")


# Run as `python -c`: a Ctrl-C lands the moment the CLI's imports reach torch (a finder on sys.meta_path sends
# it), whatever the machine's speed; SIGINT is Python's own first, as in a terminal (a background job ignores it).
_CTRL_C_IN_IMPORTS = """
import importlib.abc, os, signal, sys
{handler}
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
import trajinv.cli
print("imported; SIGINT handler is Python's own:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
{after}
"""


def _ctrl_c_in_imports(handler: str, after: str = ""):
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]  # this checkout's trajinv, not an installed one
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", _CTRL_C_IN_IMPORTS.format(handler=handler, after=after)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_ctrl_c_while_the_cli_imports_torch_is_aborted_not_a_traceback():
    # was a KeyboardInterrupt traceback from inside torch's import (exit -2), before click's handling starts
    proc = _ctrl_c_in_imports("signal.signal(signal.SIGINT, signal.default_int_handler)",
                              "trajinv.cli.main(['tune', '--help'])")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "\nAborted!\n"), proc.stderr


def test_ctrl_c_handler_of_the_imports_is_temporary_and_leaves_anothers_alone():
    proc = _ctrl_c_in_imports("signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                              "os.kill = lambda *a: None  # no Ctrl-C: the import runs through")
    assert proc.returncode == 0 and "handler is Python's own: True" in proc.stdout, proc.stderr
    proc = _ctrl_c_in_imports("seen = []\nsignal.signal(signal.SIGINT, lambda *a: seen.append(1))",
                              "print('kept:', seen == [1] and signal.getsignal(signal.SIGINT).__name__)")
    assert proc.returncode == 0 and "kept: <lambda>" in proc.stdout, proc.stderr


def test_a_tunes_progress_bars_are_labelled_by_stage():
    # every stage's bar read "tune": which stage was running (a scan, the zoom, a check) went unsaid
    import io

    from rich.console import Console

    from trajinv.cli import _Progress

    progress = _Progress("tune")
    with progress:
        for name, kind in (("1-scan", "scan"), ("2-zoom", "zoom"), ("lr-3-scan", "scan")):
            progress("stage", name=name, stage_kind=kind, members=3)
            progress("start", total=3)
            progress("advance", steps=3)
        console = Console(file=io.StringIO(), width=120)
        console.print(progress.bar.make_tasks_table(progress.bar.tasks))
    labels = [line.split()[:2] for line in console.file.getvalue().splitlines()]
    assert labels == [["tune", "1-scan"], ["tune", "2-zoom"], ["tune", "lr-3-scan"]], console.file.getvalue()
    sweep = _Progress("sweep")  # a sweep's one bar keeps its command's name
    with sweep:
        sweep("start", total=2)
        console = Console(file=io.StringIO(), width=120)
        console.print(sweep.bar.make_tasks_table(sweep.bar.tasks))
    assert console.file.getvalue().split()[0] == "sweep"
