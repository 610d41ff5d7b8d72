"""Bad input: one line on stderr naming the bad value, exit code 1, no traceback, nothing touched.

Through click's runner (most cases), as real `trajinv` processes (a handful) and through
the Python API (the exception type and a one-line message naming the value). Every case
runs against a workspace holding a finished run, a finished sweep, damaged run
directories and odd data files, and checks that every file and folder in it is the same,
byte for byte, afterwards (and that a failed command created nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trajinv.cli import main

TINY = ["--steps", "2", "--eval-every", "2", "--eval-seqs", "8", "--log-every", "1", "--checkpoint-every", "1",
        "--warmup", "1", "--batch-size", "4"]
PAIR = ["--lr", "0.01", "--wd", "0.5"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: what a user has on disk when they type something wrong."""
    root = tmp_path_factory.mktemp("ws")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    run = CliRunner().invoke(main, ["train", *TINY, *PAIR, "--data", str(corpus), "--out", str(root / "run")])
    assert run.exit_code == 0, run.output
    sweep = CliRunner().invoke(main, ["sweep", *TINY, "--lr", "0.01", "--wd", "0.5", "--data", str(corpus),
                                      "--no-plots", "--out", str(root / "sw")])
    assert sweep.exit_code == 0, sweep.output
    # a run whose every checkpoint is damaged, one with a bad metrics line, odd data files
    shutil.copytree(root / "run", root / "damaged")
    for p in (root / "damaged").glob("checkpoint-*.safetensors"):
        p.write_bytes(p.read_bytes()[:100])
    shutil.copytree(root / "run", root / "badmetrics")
    lines = (root / "badmetrics" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (root / "badmetrics" / "metrics.jsonl").write_text("".join(lines[:1] + ["{not json\n"] + lines[1:]))
    shutil.copytree(root / "run", root / "badsidecar")
    for p in (root / "badsidecar").glob("checkpoint-*.json"):
        p.write_text(p.read_text().replace('"tokens"', '"tokenz"'))
    (root / "badspec").mkdir()
    (root / "badspec" / "spec.json").write_text("{")
    (root / "nometrics").mkdir()
    (root / "nodocs").mkdir()
    (root / "empty.txt").write_text("")
    (root / "data.csv").write_text("a,b\n")
    (root / "latin1.txt").write_bytes("déjà vu\n".encode("latin-1"))
    (root / "badtok.json").write_text("{garbage")
    (root / "short.txt").write_text("too short for eight validation windows\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(args: list[str], ws: Path) -> list[str]:
    return [a.format(ws=ws) for a in args]


TRAIN = ["train", *TINY, "--data", "{ws}/corpus.txt", "--out", "{ws}/new"]
SWEEP = ["sweep", *TINY, "--data", "{ws}/corpus.txt", "--no-plots", "--out", "{ws}/newsweep"]
TUNE = ["tune", *TINY, "--points", "3", "--zoom-points", "0", "--data", "{ws}/corpus.txt", "--out", "{ws}/newtune"]
LONG = "x" * 300

# (extra arguments, text the one error line must contain)
CLI_CASES = [
    # members
    (TRAIN + ["--lr", "-0.1"], "-0.1"),
    (TRAIN + ["--lr", "0"], "0.0"),
    (TRAIN + ["--lr", "inf"], "inf"),
    (TRAIN + ["--lr", "nan"], "nan"),
    (TRAIN + ["--wd", "-1"], "-1"),
    (TRAIN + ["--wd", "inf"], "inf"),
    (TRAIN + ["--wd", "nan"], "nan"),
    (TRAIN + ["--lr", "0.1", "--lr", "0.2"], "2 times"),
    (TRAIN + ["--wd", "0.1", "--wd", "0.2", "--wd", "0.3"], "3 times"),
    # run length, logging, checkpoints
    (TRAIN + ["--steps", "0"], "0"),
    (TRAIN + ["--steps", "-5"], "-5"),
    (TRAIN + ["--eval-every", "0"], "eval_every"),
    (TRAIN + ["--eval-seqs", "0"], "eval_seqs"),
    (TRAIN + ["--log-every", "-1"], "-1"),
    (TRAIN + ["--checkpoint-every", "-1"], "checkpoint_every must be >= 0, got -1"),  # not micro_batch too
    (TRAIN + ["--keep-checkpoints", "0"], "keep_checkpoints"),
    (TRAIN + ["--micro-batch", "-2"], "micro_batch must be >= 0, got -2"),
    # schedule and optimizer
    (TRAIN + ["--warmup", "-1"], "-1"),
    (TRAIN + ["--decay-fraction", "1.5"], "1.5"),
    (TRAIN + ["--decay-fraction", "nan"], "nan"),
    (TRAIN + ["--beta1", "1.0"], "1.0"),
    (TRAIN + ["--beta2", "-0.1"], "-0.1"),
    (TRAIN + ["--beta1", "nan"], "nan"),
    (TRAIN + ["--clip", "nan"], "nan"),
    (TRAIN + ["--clip", "-1"], "-1"),
    (TRAIN + ["--clip", "inf"], "inf"),
    # batch sizes and schedules
    (TRAIN + ["--batch-size", "0"], "'0'"),
    (TRAIN + ["--batch-size", "-4"], "-4"),
    (TRAIN + ["--batch-size", "abc"], "abc"),
    (TRAIN + ["--batch-size", "8@nan,32"], "8@nan,32"),
    (TRAIN + ["--batch-size", "8@inf,32"], "8@inf,32"),
    (TRAIN + ["--batch-size", "8@2,16"], "8@2,16"),
    (TRAIN + ["--batch-size", "8@0.5,4@0.2,16"], "8@0.5,4@0.2,16"),
    (TRAIN + ["--batch-size", "8@0.5"], "8@0.5"),
    (TRAIN + ["--batch-size", "8,16"], "8,16"),
    (TRAIN + ["--batch-size", ""], "schedule ''"),  # was taken as "not given": batch 32
    (TUNE + ["--batch-size", ""], "schedule ''"),
    # data and tokenizer
    (TRAIN + ["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (TRAIN + ["--data", "{ws}/empty.txt"], "empty.txt"),
    (TRAIN + ["--data", "{ws}/nodocs"], "nodocs"),
    (TRAIN + ["--data", "{ws}/data.csv"], "data.csv"),
    (TRAIN + ["--data", "{ws}/latin1.txt"], "latin1.txt' is not UTF-8 text: invalid byte 0xe9 at offset 1"),
    (TRAIN + ["--eval-seqs", "100000"], "not --eval-seqs 100000: lower --eval-seqs"),
    # no window of the preset's context fits: the presets with a shorter one are the way out (there is no --context)
    (TRAIN + ["--preset", "gpt-164m"], "too few for one window of context 1024 + 1 tokens: give more data, or a "
     "shorter context: --preset tiny (context 64), --preset small (context 256; --eval-seqs at most 2)"),
    (TRAIN + ["--data", "hf:no-such-dataset-xyz"], "no-such-dataset-xyz"),
    (TRAIN + ["--tokenizer", "/no/such/tokenizer.json"], "/no/such/tokenizer.json"),
    (TRAIN + ["--tokenizer", "{ws}/badtok.json"], "badtok.json"),
    (TRAIN + ["--seed", "-1"], "-1"),
    (TRAIN + ["--seed", "99999999999999999999"], "seed must be an integer in [0, 2**64), got 99999999999999999999"),
    # gradient noise scale
    (TRAIN + ["--gns", "micro-batch", "--micro-batch", "2", "--gns-every", "0"], "(--gns-every) must be an int >= 1, got 0"),
    (TRAIN + ["--gns", "micro-batch", "--micro-batch", "3"], "micro_batch=3"),
    (TRAIN + ["--gns", "micro-batch"], "micro_batch=0"),
    (TRAIN + ["--gns", "micro-batch", "--micro-batch", "4"], "micro_batch=4"),
    (TRAIN + ["--gns", "per-example", "--gns-embeddings"], "embeddings"),
    (TRAIN + ["--gns", "micro-batch", "--micro-batch", "2", "--gns-warmup", "0"], "(--gns-warmup) must be >= 1, got 0"),
    # output directories: existing runs, damaged ones, and paths the file system refuses
    (TRAIN[:-1] + ["{ws}/run", *PAIR], "--resume"),
    (TRAIN[:-1] + ["{ws}/run", *PAIR, "--resume", "--steps", "3"], "different configuration (train.steps (2 there, 3 here))"),
    (TRAIN[:-1] + ["{ws}/damaged", *PAIR, "--resume"], "checkpoint-00000002.safetensors"),
    (TRAIN[:-1] + ["{ws}/badmetrics", *PAIR, "--resume"], "metrics.jsonl:2"),
    (TRAIN[:-1] + ["{ws}/badsidecar", *PAIR, "--resume"], "checkpoint-00000002.json"),
    (TRAIN[:-1] + ["{ws}/corpus.txt/sub"], "corpus.txt/sub"),
    (TRAIN[:-1] + ["/sys/trajinv-out"], "/sys/trajinv-out"),
    (TRAIN[:-1] + ["/proc/trajinv-out"], "/proc/trajinv-out"),
    (TRAIN[:-1] + ["{ws}/" + LONG], LONG),
    # sweeps
    (SWEEP + ["--lr-log2", "0:1100"], "0:1100"),
    (SWEEP + ["--lr-log2", "3:1"], "3:1"),
    (SWEEP + ["--lr-log2", "a:b"], "a:b"),
    (SWEEP + ["--lr-log2", "0:1:0"], "0:1:0"),
    (SWEEP + ["--lr-log2", "0:nan"], "0:nan"),
    (SWEEP + ["--lr-log2", "-2000:-1999", "--wd", "0.5"], "0.0"),
    (SWEEP + ["--lr-log2", "0:100000:0.001"], "0:100000:0.001"),
    (SWEEP + ["--wd-log2", "nan:1", "--lr", "0.01"], "nan:1"),
    (SWEEP + ["--lr", "0.01", "--elr", "0"], "0.0"),
    (SWEEP + ["--lr", "0.01", "--elr", "-1"], "-1"),
    (SWEEP + ["--lr", "0.01", "--elr", "inf"], "inf"),
    (SWEEP + ["--lr", "2", "--wd", "1"], "lr*wd = 2 >= 1"),  # decay would flip the weights every step
    (SWEEP + ["--lr", "0.01", "--wd", "-0.5"], "-0.5"),
    (SWEEP + ["--population", "-1"], "-1"),
    (SWEEP + ["--batch-size", "0"], "'0'"),
    (SWEEP + ["--batch-size", "4@nan,8"], "4@nan,8"),
    (SWEEP + ["--data", "/no/such/dir"], "/no/such/dir"),
    (SWEEP + ["--micro-batch", "3", "--gns", "micro-batch"], "micro_batch=3"),
    (SWEEP[:-1] + ["{ws}/sw", "--lr", "0.03", "--wd", "0.5"], "another spec"),
    (SWEEP[:-1] + ["{ws}/badspec"], "spec.json"),
    (SWEEP[:-1] + ["{ws}/corpus.txt"], "corpus.txt"),
    (SWEEP + ["--devices", "cuda:99"], "cuda:99"),
    # it trained on the CPU without a word
    (SWEEP + ["--device", "cuda", "--devices", "cpu,cpu"], "--device cuda with --devices cpu,cpu"),
    (TUNE + ["--device", "cuda", "--devices", "cpu,cpu"], "--device cuda with --devices cpu,cpu"),
    # tunes: refused before tune_spec.json is written (else the corrected command is "another spec")
    (TUNE + ["--devices", "cuda:99"], "cuda:99"),
    (TUNE + ["--data", "/no/such/dir"], "/no/such/dir"),
    (TUNE + ["--steps", "0"], "steps must be positive, got 0"),
    (TUNE + ["--check-factor", "1e-320"], "1e-320"),
    # a validation split too small: found when the first population built its Trainer, after spec.json
    (SWEEP + ["--eval-seqs", "100000"], "not --eval-seqs 100000: lower --eval-seqs"),
    (TUNE + ["--eval-seqs", "100000"], "not --eval-seqs 100000: lower --eval-seqs"),
    (TUNE + ["--octaves", "1e308"], "octaves must be at most 40"),  # left tune_spec.json behind
    (TUNE + ["--octaves", "2000"], "octaves must be at most 40"),  # trained every stage, then overflowed
    (TUNE + ["--center-elr", "1e-323"], "the first scan around 9.88131e-324 over 6 octaves has no valid points"),
    (TUNE + ["--decay-mode", "independent"], "decay_mode 'independent': the tune searches torch-mode weight decay"),
    (TUNE + ["--devices", "cpu", "--ray", "local"], "give --devices or --ray, not both"),
    (TUNE + ["--ray", "local", "--ray-cpus", "0"], "--ray-cpus must be >= 1, got 0"),
    (TUNE + ["--ray", "127.0.0.1:1"], "nothing answers at 127.0.0.1:1"),
    (SWEEP + ["--ray", "local", "--ray-cpus", "0"], "--ray-cpus must be >= 1, got 0"),
    # analysis
    (["analyze", "/no/such/sweep"], "/no/such/sweep"),
    (["analyze", "{ws}/nometrics"], "nometrics"),
    (["analyze", "{ws}/corpus.txt"], "corpus.txt"),
    (["analyze"], "SWEEP_DIR"),
    # what click rejects itself: still one line and exit code 1
    (TRAIN + ["--steps", "abc"], "abc"),
    (TRAIN + ["--lr", "1e-3x"], "1e-3x"),
    (TRAIN + ["--preset", "huge"], "huge"),
    (TRAIN + ["--dtype", "fp8"], "fp8"),
    (TRAIN + ["--gns", "sometimes"], "sometimes"),
    (TRAIN + ["--no-such-option"], "--no-such-option"),
    (["trian", "--steps", "3"], "trian"),
]
if not torch.cuda.is_available():  # a machine without CUDA, asked for it
    CLI_CASES += [(TRAIN + ["--device", "cuda"], "cuda"), (SWEEP + ["--device", "cuda"], "'cuda'"),
                  (TUNE + ["--device", "cuda"], "'cuda'")]


def _check_one_line_error(code: int, stderr: str, needle: str, combined: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, f"exit code {code}: {combined}"
    assert len(lines) == 1, f"stderr has {len(lines)} lines: {stderr!r}"
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in combined


def test_enough_distinct_bad_inputs():
    distinct = {tuple(args) for args, _ in CLI_CASES} | {name for name, *_ in API_CASES}
    assert len(distinct) >= 70 and len(distinct) == len(CLI_CASES) + len(API_CASES)


def _id(args: list[str]) -> str:
    base = {"train": TRAIN, "sweep": SWEEP, "tune": TUNE}.get(args[0])
    rest = args[len(base):] if base and args[: len(base)] == base else args[len(base) - 1:] if base else args
    return f"{args[0]} {' '.join(rest)}"[:70]


@pytest.mark.parametrize("args, needle", CLI_CASES, ids=[_id(a) for a, _ in CLI_CASES])
def test_cli_bad_input(ws, args, needle):
    args, needle = _fill(args, ws), needle.format(ws=ws)
    before = snapshot(ws)
    res = CliRunner().invoke(main, args)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    _check_one_line_error(res.exit_code, res.stderr, needle, res.output)
    assert snapshot(ws) == before


@pytest.mark.parametrize("args", [TRAIN, SWEEP, TUNE, ["fit", "{ws}/sw", "{ws}/sw"]], ids=["train", "sweep", "tune", "fit"])
def test_an_empty_out_is_refused_and_writes_nothing(ws, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '' wrote a whole run (a tune's stages, json and plots) into the current directory
    res = CliRunner().invoke(main, _fill(args, ws) + ["--out", ""])
    _check_one_line_error(res.exit_code, res.stderr, "'--out': '' is not a directory name", res.output)
    assert list(tmp_path.iterdir()) == []


SUBPROCESS_CASES = [
    (SWEEP + ["--lr-log2", "0:1100"], "0:1100"),
    (TRAIN + ["--wd", "inf"], "inf"),
    (TRAIN + ["--clip", "nan"], "nan"),
    (TRAIN + ["--batch-size", "8@nan,32"], "8@nan,32"),
    (TRAIN[:-1] + ["/sys/trajinv-out"], "/sys/trajinv-out"),
]


@pytest.mark.parametrize("args, needle", SUBPROCESS_CASES)
def test_trajinv_command_bad_input(ws, args, needle):
    exe = Path(sys.executable).with_name("trajinv")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trajinv"]
    before = snapshot(ws)
    proc = subprocess.run(cmd + _fill(args, ws), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    _check_one_line_error(proc.returncode, proc.stderr, needle, proc.stdout + proc.stderr)
    assert snapshot(ws) == before


def test_data_refused_after_its_first_tokenization_is_one_line_and_nothing_else(ws):
    # datasets' tokenize bar stood above the error line (with a carriage return per update), and the
    # progress display printed its empty last frame on stdout, though training never started
    exe = Path(sys.executable).with_name("trajinv")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trajinv"]
    args = ["sweep", *TINY, "--data", f"{ws}/short.txt", "--no-plots", "--out", f"{ws}/newsweep"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    _check_one_line_error(proc.returncode, proc.stderr, "short.txt", proc.stdout + proc.stderr)
    assert "\r" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("args", [SWEEP, TUNE], ids=["sweep", "tune"])
def test_triton_kernels_on_cpu_without_the_interpreter_write_nothing(ws, args):
    # the tests run under TRITON_INTERPRET=1 (conftest); a user's shell does not. On --device cpu (the
    # default) Triton has no CUDA tensors to run on, whether or not the machine has a GPU
    exe = Path(sys.executable).with_name("trajinv")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trajinv"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    before = snapshot(ws)
    proc = subprocess.run(cmd + _fill(args, ws) + ["--kernels", "triton"], capture_output=True, text=True,
                          timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    _check_one_line_error(proc.returncode, proc.stderr, "--kernels triton", proc.stdout + proc.stderr)
    assert snapshot(ws) == before


# ------------------------------------------------------------------------------- the API


def _fused(**kw):
    from trajinv.optim import FusedAdamW

    return FusedAdamW([torch.nn.Parameter(torch.zeros(2, 3))], **kw)


def _sparse_step():
    from trajinv.optim import FusedAdamW

    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = FusedAdamW([p])
    p.grad = torch.ones(4, 3).to_sparse()
    opt.step()


def _gpt(**kw):
    from trajinv.config import ModelConfig
    from trajinv.model import GPT

    base = dict(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=64)
    base.update(kw)
    return GPT(ModelConfig(**base))


def _member(**kw):
    from trajinv.config import Member

    return Member(**kw)


def _validate(cls_name, **kw):
    import trajinv.config as C

    getattr(C, cls_name)(**kw).validate()


def _totals():
    from trajinv.optim.population import ParamStats

    ParamStats(["head"], torch.zeros(1, 4, 2)).totals(["head", "wte"])


def _load_damaged(ws):
    from trajinv.checkpoint import load_checkpoint

    load_checkpoint(ws / "damaged")


def _schedule(text):
    from trajinv.schedules import BatchSchedule

    BatchSchedule.parse(text)


def _log2(text):
    from trajinv.sweep import log2_range

    log2_range(text)


def _save_keep0(ws):
    from trajinv.checkpoint import save_checkpoint

    save_checkpoint(ws / "new", 1, {"x": torch.ones(1)}, {}, keep=0)


def _sweep_spec(**kw):
    from trajinv.sweep import SweepSpec

    base = dict(lrs=(0.01,), wds=(1.0,))
    base.update(kw)
    SweepSpec(**base).validate()


def _gns(**kw):
    from trajinv.config import GNSConfig

    GNSConfig(**kw)


def _ema(beta):
    from trajinv.gns.estimator import DebiasedEMA

    DebiasedEMA(beta)


def _trainer_vocab(ws):
    from trajinv.config import Member, ModelConfig, TrainConfig
    from trajinv.data import DataConfig, load_data
    from trajinv.train import Trainer

    data = load_data(DataConfig(source=str(ws / "corpus.txt")))
    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=100),
                      members=(Member(),))
    Trainer(cfg, data, ws / "new")


# (name, call taking the workspace, exception type, text the message must contain)
API_CASES = [
    ("Member(lr=inf)", lambda ws: _member(lr=math.inf), ValueError, "inf"),
    ("Member(lr=0)", lambda ws: _member(lr=0.0), ValueError, "0.0"),
    ("Member(wd=inf)", lambda ws: _member(wd=math.inf), ValueError, "inf"),
    ("Member(wd=nan)", lambda ws: _member(wd=math.nan), ValueError, "nan"),
    ("Member(wd=-1)", lambda ws: _member(wd=-1.0), ValueError, "-1.0"),
    ("FusedAdamW(weight_decay=-0.1)", lambda ws: _fused(weight_decay=-0.1), ValueError, "-0.1"),
    ("FusedAdamW(weight_decay=nan)", lambda ws: _fused(weight_decay=math.nan), ValueError, "nan"),
    ("FusedAdamW(eps=-1e-8)", lambda ws: _fused(eps=-1e-8), ValueError, "-1e-08"),
    ("FusedAdamW(lr=-1)", lambda ws: _fused(lr=-1.0), ValueError, "-1.0"),
    ("FusedAdamW(lr=[1e-3, inf])", lambda ws: _fused(lr=[1e-3, math.inf], weight_decay=[0.0, 0.0]), ValueError,
     "inf (member 1)"),
    ("FusedAdamW(betas=(1.0, 0.9))", lambda ws: _fused(betas=(1.0, 0.9)), ValueError, "1.0"),
    ("FusedAdamW sparse grad", lambda ws: _sparse_step(), TypeError, "sparse"),
    ("GPT(vocab_size=0)", lambda ws: _gpt(vocab_size=0), ValueError, "vocab_size"),
    ("GPT(d_ff=0)", lambda ws: _gpt(d_ff=0), ValueError, "d_ff"),
    ("GPT(norm_eps=nan)", lambda ws: _gpt(norm_eps=math.nan), ValueError, "nan"),
    ("GPT(rope_theta=0)", lambda ws: _gpt(rope_theta=0.0), ValueError, "rope_theta"),
    ("OptimConfig(eps=-1)", lambda ws: _validate("OptimConfig", eps=-1.0), ValueError, "-1.0"),
    ("OptimConfig(clip=nan)", lambda ws: _validate("OptimConfig", clip=math.nan), ValueError, "nan"),
    ("ScheduleConfig(warmup=-1)", lambda ws: _validate("ScheduleConfig", warmup=-1), ValueError, "-1"),
    ("TrainConfig(keep_checkpoints=0)", lambda ws: _validate("TrainConfig", keep_checkpoints=0), ValueError,
     "keep_checkpoints"),
    ("BatchSchedule 8@nan,32", lambda ws: _schedule("8@nan,32"), ValueError, "8@nan,32"),
    ("log2_range 0:1100", lambda ws: _log2("0:1100"), ValueError, "0:1100"),
    ("GNSConfig per-example + embeddings", lambda ws: _gns(mode="per-example", embeddings=True), ValueError,
     "embeddings"),
    ("DebiasedEMA(beta=1)", lambda ws: _ema(1.0), ValueError, "1.0"),
    ("ParamStats.totals missing name", lambda ws: _totals(), KeyError, "'wte'"),
    ("load_checkpoint damaged", _load_damaged, ValueError, "checkpoint-00000002.safetensors"),
    ("save_checkpoint keep=0", _save_keep0, ValueError, "keep"),
    ("SweepSpec(elrs=(0,))", lambda ws: _sweep_spec(elrs=(0.0,)), ValueError, "0.0"),
    ("Trainer vocab below the data's", _trainer_vocab, ValueError, "256"),
]


@pytest.mark.parametrize("name, call, exc, needle", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(ws, name, call, exc, needle):
    before = snapshot(ws)
    with pytest.raises(exc) as e:
        call(ws)
    message = e.value.args[0] if isinstance(e.value, KeyError) else str(e.value)
    assert needle in message and "\n" not in message, message
    assert snapshot(ws) == before


def test_no_spec_left_by_a_failed_sweep(ws, tmp_path):
    """The issue's case: the failed sweep must not block the corrected command."""
    out = tmp_path / "X"
    bad = CliRunner().invoke(main, _fill(SWEEP[:-1], ws) + [str(out), "--data", "/no/such/missing.txt"])
    assert bad.exit_code == 1 and not out.exists()
    good = CliRunner().invoke(main, _fill(SWEEP[:-1], ws) + [str(out)])
    assert good.exit_code == 0, good.output
    assert json.loads((out / "spec.json").read_text())["data"]["source"].endswith("corpus.txt")
