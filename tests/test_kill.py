"""SIGKILL at every commit point, inside checkpoint writes, before the first checkpoint, during
the resume's metrics rewrite and at random points; then rerun to completion.

Each scenario runs `trajinv sweep` (or `train`) in a real process that kills itself with
SIGKILL at the chosen point (tests/kill_driver.py wraps the product functions from the
outside), possibly again during the resume, then reruns the same command to the end, and
asserts the run directory equals an uninterrupted run's: summary and spec byte for byte,
checkpoint tensor files byte for byte, sidecars and metrics lines equal except wall-clock
seconds (so no line is duplicated or missing), and no other file (no temporary files, no
orphaned tensors). The processes are forked from one driver that imported everything once,
which keeps the suite near a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

DRIVER = Path(__file__).with_name("kill_driver.py")
STEPS = ["--steps", "6", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "1", "--checkpoint-every", "2",
         "--warmup", "1", "--batch-size", "4"]
MEMBERS = ["--lr", "0.01", "--wd", "0.5", "--lr", "0.02", "--wd", "0.5"]
SIGKILL = -9


class Driver:
    """The forking driver (kill_driver.py serve): one job per line, its exit status back."""

    def __init__(self, env: dict, logs: Path):
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)

    def run(self, args: list[str], kill: dict | None = None, env: dict | None = None, timeout: float = 180,
            max_file_bytes: int = 0) -> int:
        self.n += 1
        log = self.logs / f"job{self.n}.log"
        job = {"args": args, "kill": kill, "env": env or {}, "cwd": str(self.logs), "log": str(log),
               "max_file_bytes": max_file_bytes}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"job {job} did not finish in {timeout} s; log: {log.read_text()[-2000:]}")
        rc = json.loads(self.proc.stdout.readline())["rc"]
        self.last_log = log.read_text()
        return rc

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    logs = root / "logs"
    logs.mkdir()
    # one thread per process: on a busy 2-core machine two spinning OpenMP threads per run
    # made each run ~10x slower (results do not depend on the thread count)
    env = dict(os.environ, TRAJINV_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    driver = Driver(env, logs)
    sweep = ["sweep", *STEPS, *MEMBERS, "--data", str(corpus), "--no-plots"]
    train = ["train", *STEPS, *MEMBERS, "--data", str(corpus)]
    refs = {}
    for name, args in (("sweep", sweep), ("train", train)):
        out = root / "ref" / name / "run"
        assert driver.run(args + ["--out", str(out)]) == 0, driver.last_log
        refs[name] = snapshot(out)
    yield {"root": root, "driver": driver, "args": {"sweep": sweep, "train": train}, "refs": refs}
    driver.close()


def snapshot(out: Path) -> dict[str, object]:
    """Every file under `out`: bytes, except metrics lines and sidecars without wall-clock seconds."""
    files: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if p.name == "metrics.jsonl":
            files[rel] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in p.read_text().splitlines()]
        elif p.name.startswith("checkpoint-") and p.suffix == ".json":
            files[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
        elif p.suffix == ".safetensors":  # every tensor bit for bit (the header's key order may vary)
            with safe_open(str(p), framework="pt") as f:
                files[rel] = (f.metadata(), {k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(
                    torch.uint8).numpy().tobytes()) for k in f.keys() for t in [f.get_tensor(k)]})
        else:
            files[rel] = p.read_bytes()
    return files


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), "files differ (leftovers or missing files)"
    for name in want:
        if isinstance(want[name], list):  # metrics: no line duplicated, missing or different
            assert len(got[name]) == len(want[name]), f"{name}: {len(got[name])} lines, want {len(want[name])}"
        assert got[name] == want[name], f"{name} differs from the uninterrupted run's"


def kill_then_finish(world, name: str, kills: list[dict], command: str = "sweep", env: dict | None = None,
                     must_die: bool = True) -> Path:
    """Run `command` once per kill spec (each killed), then to the end; compare with the reference."""
    driver, args = world["driver"], world["args"][command]
    out = world["root"] / "scenarios" / name / "run"
    resume = ["--resume"] if command == "train" else []
    for i, kill in enumerate(kills):
        rc = driver.run(args + ["--out", str(out)] + (resume if i else []), kill=kill, env=env)
        if must_die:
            assert rc == SIGKILL, f"{name}: kill {kill} not reached (rc {rc}): {driver.last_log[-2000:]}"
    rc = driver.run(args + ["--out", str(out)] + resume, env=env)
    assert rc == 0, f"{name}: the rerun failed: {driver.last_log[-2000:]}"
    assert "Traceback" not in driver.last_log
    assert_same(snapshot(out), world["refs"][command])
    return out


SCENARIOS = {
    # before the first checkpoint: half a metrics line of step 1 (then the resume finds no checkpoint)
    "before-first-checkpoint": [{"at": "metrics", "n": 1, "frac": 0.5}],
    # after a checkpoint: lines of steps the checkpoint does not cover, the last one half written
    "metrics-after-checkpoint": [{"at": "metrics", "n": 5, "frac": 0.3}],
    # the first checkpoint's tensors fully in their temporary file, not renamed
    "first-tensors-not-renamed": [{"at": "replace", "match": "checkpoint-*.safetensors", "n": 1, "when": "before"}],
    # inside a checkpoint write: half the tensor bytes in the temporary file
    "inside-tensor-write": [{"at": "write", "match": "checkpoint-*.safetensors", "n": 2, "frac": 0.5}],
    # tensors renamed into place, sidecar never written (the commit did not happen)
    "tensors-renamed-no-sidecar": [{"at": "replace", "match": "checkpoint-*.safetensors", "n": 2, "when": "after"}],
    # inside the sidecar write
    "inside-sidecar-write": [{"at": "write", "match": "checkpoint-*.json", "n": 3, "frac": 0.5}],
    # sidecar complete in its temporary file, one rename short of the commit
    "sidecar-not-renamed": [{"at": "replace", "match": "checkpoint-*.json", "n": 2, "when": "before"}],
    # right after the commit point
    "just-committed": [{"at": "replace", "match": "checkpoint-*.json", "n": 2, "when": "after"}],
    # pruning: the oldest sidecar deleted, its tensor file not yet
    "mid-prune": [{"at": "unlink", "match": "checkpoint-*", "n": 1, "when": "after"}],
    # the sweep's spec and summary writes
    "spec-not-renamed": [{"at": "replace", "match": "spec.json", "n": 1, "when": "before"}],
    "inside-summary-write": [{"at": "write", "match": "summary.csv", "n": 1, "frac": 0.5}],
    # killed again while the resume rewrites metrics.jsonl: inside the write, and one rename short
    "inside-resume-metrics-rewrite": [{"at": "metrics", "n": 6, "frac": 0.5},
                                      {"at": "write", "match": "metrics.jsonl", "n": 1, "frac": 0.5}],
    "resume-metrics-rewrite-not-renamed": [{"at": "metrics", "n": 3, "frac": 1.0},
                                           {"at": "replace", "match": "metrics.jsonl", "n": 1, "when": "before"}],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_at_chosen_point_then_finish(world, name):
    kill_then_finish(world, name, SCENARIOS[name])


def _random_kills(seed: int) -> list[dict]:
    """One to three kills at call counts drawn from `seed` (reproducible)."""
    rng = random.Random(seed)
    pool = [lambda: {"at": "metrics", "n": rng.randint(1, 6), "frac": rng.random()},
            lambda: {"at": "replace", "match": rng.choice(["checkpoint-*", "metrics.jsonl", "*"]),
                     "n": rng.randint(1, 4), "when": rng.choice(["before", "after"])},
            lambda: {"at": "write", "match": rng.choice(["checkpoint-*", "*"]), "n": rng.randint(1, 4),
                     "frac": rng.random()},
            lambda: {"at": "unlink", "match": "checkpoint-*", "n": rng.randint(1, 2),
                     "when": rng.choice(["before", "after"])}]
    return [rng.choice(pool)() for _ in range(rng.randint(1, 3))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_random_call_then_finish(world, seed):
    # a drawn call count may lie beyond what a (resumed) run makes: then that run just finishes
    kill_then_finish(world, f"random-{seed}", _random_kills(seed), must_die=False)


def test_kill_at_random_time_then_finish(world):
    delays = [round(random.Random(7).uniform(0.2, 2.5), 2), round(random.Random(8).uniform(0.2, 2.5), 2)]
    kill_then_finish(world, "timer", [{"at": "timer", "seconds": s} for s in delays], must_die=False)


@pytest.mark.parametrize("name, kills", [
    ("train-before-first-checkpoint", [{"at": "metrics", "n": 1, "frac": 0.5}]),
    ("train-inside-checkpoint", [{"at": "write", "match": "checkpoint-*.safetensors", "n": 2, "frac": 0.7}]),
])
def test_train_killed_then_resumed(world, name, kills):
    """`train` then `train --resume`: the issue's duplicated metrics lines came from this path."""
    kill_then_finish(world, name, kills, command="train")


def test_kill_during_first_tokenization(world):
    cache = world["root"] / "fresh-cache"
    kill_then_finish(world, "tokenize", [{"at": "tokenize"}], env={"TRAJINV_CACHE": str(cache)})
    assert not list(cache.glob(".hf-scratch-*")), "the killed tokenization's scratch folder is still there"
    assert not list(cache.rglob("*.tmp"))


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_full_disk_is_one_line_then_the_rerun_finishes(world, command):
    """Every file write beyond 100 kB fails (EFBIG, as ENOSPC would): the first checkpoint
    cannot be written. One line naming it, exit code 1, nothing half-written left; the rerun
    with room to write ends where an uninterrupted run does."""
    driver, args = world["driver"], world["args"][command]
    out = world["root"] / "scenarios" / f"full-disk-{command}" / "run"
    rc = driver.run(args + ["--out", str(out)], max_file_bytes=100_000)
    lines = [line for line in driver.last_log.splitlines() if line.startswith("Error")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in driver.last_log, driver.last_log[-2000:]
    assert "File too large" in lines[0] and str(out / "runs/bs4" if command == "sweep" else out) in lines[0]
    assert "checkpoint-00000002.safetensors" in lines[0]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    rc = driver.run(args + ["--out", str(out)] + (["--resume"] if command == "train" else []))
    assert rc == 0, driver.last_log[-2000:]
    assert_same(snapshot(out), world["refs"][command])
