"""Each bench script still runs end to end (--quick) and writes its table: no silent bit rot.

Times are never asserted here; the scripts themselves report ratios.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_quick(script: str, results: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(BENCH.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRAJINV_BENCH_RESULTS"] = str(results)  # a full run's tables in bench/results/ stay as they are
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("script, csv", [("bench_adamw.py", "adamw.csv"), ("bench_gns.py", "gns.csv"),
                                         ("bench_gns_kernels.py", "gns_kernels.csv"),
                                         ("bench_trainer.py", "trainer.csv"), ("bench_tune.py", "tune.csv"),
                                         ("tune_surrogate.py", "tune_surrogate.csv"),
                                         ("bench_setting.py", "setting.csv"),
                                         ("bench_scale.py", "scale.csv"),
                                         ("bench_phase.py", "phase.csv")])
def test_bench_script_runs_quick(script, csv, tmp_path):
    proc = run_quick(script, tmp_path)
    # --quick writes below quick/, never where a full run's table lives
    assert "wrote" in proc.stdout and (tmp_path / "quick" / csv).is_file() and not (tmp_path / csv).exists()


def test_bench_tune_rejects_an_empty_tpe_population_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_tune.py"), "--tpe-population", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--tpe-population must be >= 1, got 0")


@pytest.mark.parametrize("script, args, needle", [
    ("bench_phase.py", ["/no/such/sweep"], "/no/such/sweep is not a sweep directory"),  # before minutes of training
    ("tune_surrogate.py", ["--runs", "/no/such/cache"], "no cached grid under /no/such/cache"),
    ("tune_surrogate.py", ["--quick", "--reps", "0"], "--reps must be >= 1, got 0"),
    ("bench_tune.py", ["--reps", "-1"], "--reps must be >= 1, got -1"),
    ("bench_tune.py", ["--seeds", "-1"], "--seeds must be >= 0, got -1"),
    ("bench_gns.py", ["--cases", "tiny"], "--cases: 'tiny' is not preset:members"),
    ("bench_gns.py", ["--cases", "huge:1"], "--cases: 'huge:1' is not preset:members"),
    ("bench_gns.py", ["--micro", "5"], "--micro 5 must split --batch 32"),
    ("bench_trainer.py", ["--members", "0"], "argument --members: must be >= 1, got 0"),
    ("bench_trainer.py", ["--preset", "foo"], "argument --preset: invalid choice: 'foo'"),
    ("bench_scale.py", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("bench_adamw.py", ["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    ("bench_gns.py", ["--quick", "--cases", "small:1"], "--quick sets its own --cases"),
    ("bench_trainer.py", ["--quick", "--members", "5"], "--quick sets its own --members"),
    ("bench_scale.py", ["--quick", "--steps", "9", "--repeats", "3"], "--quick sets its own --steps, --repeats"),
    ("bench_tune.py", ["--seeds", "0", "0"], "--seeds repeats a seed: 0 0"),  # its grid twice: seed noise 0
    ("bench_gns.py", ["--cases", "tiny:1,tiny:1"], "--cases repeats a case"),
    ("bench_phase.py", ["--quick", "--key", "nope"], "argument --key: invalid choice: 'nope'"),  # trained first
    ("bench_adamw.py", ["--out", "TMP"], "is a directory"),  # the table was lost after the whole run
    ("bench_gns_kernels.py", ["--out", "TMP/"], "is a directory"),
])
def test_bench_bad_arguments_are_one_line_before_any_work(script, args, needle, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRAJINV_BENCH_RESULTS": str(tmp_path)}
    out = tmp_path / "out"  # "TMP": an existing directory
    out.mkdir()
    args = [a.replace("TMP", str(out)) for a in args]
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in proc.stderr.strip().splitlines()[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(out.iterdir())  # nothing trained or written


def test_a_quick_runs_scratch_folder_is_removed_on_sigterm(tmp_path):
    # `timeout` sends SIGTERM, which skips atexit unless the script turns it into an exit
    import signal
    import time

    code = ("import sys, time; sys.path.insert(0, %r); from results_csv import scratch; "
            "print(scratch('bench-sigterm-'), flush=True); time.sleep(60)") % str(BENCH)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert folder.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 5
    while folder.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not folder.exists()


def test_bench_tune_without_trained_tpe_leaves_out_its_rows_only(tmp_path):
    proc = run_quick("bench_tune.py", tmp_path, "--no-tpe-trained")
    methods = {line.split(",")[0] for line in (tmp_path / "quick" / "tune.csv").read_text().splitlines()[1:]}
    assert {"tune", "random", "tpe"} <= methods and "tpe-trained" not in methods
    assert "trained over the continuous box" not in proc.stdout
