"""Every device of a node: worker processes fed from a queue, failures as rows, resume, bit-identity on CPU."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import spawned
from click.testing import CliRunner
from helpers import metrics_without_time

from trajinv.config import GNSConfig, OptimConfig
from trajinv.data import DataConfig
from trajinv.parallel.runner import failures, run_scaled
from trajinv.sweep import SweepSpec, run_sweep


def _spec(tiny_train_config, **kw):
    # three populations of one member for two workers: the queue hands out the third
    base = dict(train=tiny_train_config(steps=4, checkpoint_every=2, micro_batch=2, optim=OptimConfig(name="fused"),
                                        gns=GNSConfig(mode="micro-batch", precond_warmup=2)),
                data=DataConfig(max_tokens=200_000), lrs=(0.01, 0.02), wds=(0.5,), elrs=(0.01,), batch_sizes=("4",),
                population=1)
    base.update(kw)
    return SweepSpec(**base)


ERROR = "ValueError: unknown device 'tpu'; choose cpu, cuda"


def _table(path):
    with open(path / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_two_cpu_workers_give_the_sequential_numbers_bit_for_bit(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    run_sweep(spec, tmp_path / "seq")
    events = []
    rows = run_sweep(spec, tmp_path / "pool", devices="cpu,cpu", progress=lambda kind, **i: events.append((kind, i)))
    assert _table(tmp_path / "pool") == _table(tmp_path / "seq")  # every column, spec order
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p1", "bs4-p2"]
    for run_id in ("bs4-p0", "bs4-p1", "bs4-p2"):
        assert (metrics_without_time(tmp_path / "pool" / "runs" / run_id)
                == metrics_without_time(tmp_path / "seq" / "runs" / run_id))
    # one stream of events for one display: the total, every population, every step
    assert events[0] == ("start", {"total": 12})
    assert sorted(i["run_id"] for k, i in events if k == "population") == ["bs4-p0", "bs4-p1", "bs4-p2"]
    assert sum(i["steps"] for k, i in events if k == "advance") == 12


def test_a_failing_population_is_a_row_the_others_finish_and_a_rerun_resumes_only_it(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    events = []
    rows = run_scaled(spec, tmp_path, lambda kind, **i: events.append((kind, i)), devices="cpu,cpu",
                      task=spawned.fail_second_population)
    assert [(r["run_id"], r["status"]) for r in rows] == [("bs4-p0", "done"), ("bs4-p1", "failed"),
                                                          ("bs4-p2", "done")]
    table = _table(tmp_path)
    assert [r["status"] for r in table] == ["done", "failed", "done"]
    assert table[1]["error"] == ERROR and table[0]["error"] == ""
    # a failed row is as complete as it can be
    assert float(table[1]["tau_iter"]) == pytest.approx(1 / (float(table[1]["lr"]) * float(table[1]["wd"])))
    assert ("failed", {"run_id": "bs4-p1", "error": ERROR}) in events
    assert failures(rows) == {"bs4-p1": ERROR}
    assert "unknown device" in (tmp_path / "runs/bs4-p1/error.log").read_text()  # the traceback

    events.clear()
    rerun = run_sweep(spec, tmp_path, devices="cpu,cpu", progress=lambda kind, **i: events.append((kind, i)))
    skipped = {i["run_id"]: i["skipped"] for k, i in events if k == "population"}
    assert skipped == {"bs4-p0": True, "bs4-p1": False, "bs4-p2": True}
    assert [r["status"] for r in rerun] == ["done"] * 3 and "error" not in _table(tmp_path)[0]
    assert not (tmp_path / "runs/bs4-p1/error.log").exists()
    run_sweep(spec, tmp_path / "seq")
    assert _table(tmp_path) == _table(tmp_path / "seq")
    # all finished: the next rerun reads every population back in this process, starting no worker
    from trajinv.parallel.pool import LocalPool

    (tmp_path / "runs/bs4-p0/error.log").write_text("a failure after the last save")  # a stale one goes too
    with pytest.MonkeyPatch.context() as m:
        m.setattr(LocalPool, "_executor", lambda self, i: pytest.fail("a worker was started"))
        assert run_sweep(spec, tmp_path, devices="cpu,cpu") == rerun
    assert _table(tmp_path) == _table(tmp_path / "seq")
    assert not (tmp_path / "runs/bs4-p0/error.log").exists()
    # a finished population whose metrics cannot be read fails in its row, as in a worker; the others read back
    metrics = tmp_path / "runs/bs4-p1/metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["{not json"] + lines[2:]) + "\n")
    rows = run_sweep(spec, tmp_path, devices="cpu,cpu")
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "malformed metrics line" in rows[1]["error"]


def test_a_killed_worker_fails_its_population_only(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    rows = run_scaled(spec, tmp_path, devices="cpu,cpu", task=spawned.kill_second_population)
    assert [(r["run_id"], r["status"]) for r in rows] == [("bs4-p0", "done"), ("bs4-p1", "failed"),
                                                          ("bs4-p2", "done")]
    assert rows[1]["error"] == "worker process on cpu died while training (killed by a signal, e.g. out of memory)"
    assert rows[1]["steps"] == 0


def test_a_script_without_a_main_guard_is_told_so_not_out_of_memory(tmp_path):
    # each spawned worker re-runs the script's top level: unguarded, it started the same sweep again
    # (refused, the directory in use) and exited; every population then read "killed by a signal, e.g.
    # out of memory"
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(f'''
        from trajinv.config import ModelConfig, TrainConfig
        from trajinv.data import DataConfig
        from trajinv.sweep import SweepSpec, run_sweep

        cfg = TrainConfig(model=ModelConfig(d_model=16, n_layers=1, n_heads=2, context=16), steps=2, batch_size="4",
                          eval_seqs=8, eval_every=2)
        run_sweep(SweepSpec(train=cfg, data=DataConfig(max_tokens=20_000), lrs=(0.01,), wds=(0.1,)),
                  {str(tmp_path / "out")!r}, devices="cpu")
    '''))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    row, = _table(tmp_path / "out")
    assert row["status"] == "failed"
    assert row["error"] == ("worker process on cpu exited while starting, before it trained (its error is printed "
                            "above); a script that trains on workers needs its top level under "
                            "`if __name__ == '__main__':`")


def test_without_population_the_members_are_spread_over_the_workers(tiny_train_config, tmp_path):
    # one population of three would keep one worker busy and the other idle; the numbers are the same
    spec = _spec(tiny_train_config, population=0)
    rows = run_sweep(spec, tmp_path / "pool", devices="cpu,cpu")
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p0", "bs4-p1"]
    run_sweep(spec, tmp_path / "seq")
    assert {r["run_id"] for r in _table(tmp_path / "seq")} == {"bs4"}  # one process: one population
    strip = ("run_id", "member")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in _table(tmp_path / "pool")]
            == [{k: v for k, v in r.items() if k not in strip} for r in _table(tmp_path / "seq")])


def test_cpu_workers_get_disjoint_shares_of_the_cores(tiny_train_config, tmp_path):
    rows = run_scaled(_spec(tiny_train_config, population=2), tmp_path, devices="cpu,cpu",
                      task=spawned.report_pinning)
    assert len(rows) == 2
    a, b = (set(r["cores"]) for r in rows)
    if len(a | b) >= 2:  # a machine with a single core gives both workers that core
        assert not a & b
    assert all(r["threads"] == len(r["cores"]) for r in rows)


def test_cli_sweep_passes_devices_and_a_failure_exits_with_one_line(tmp_path, monkeypatch):
    import trajinv.sweep
    from trajinv import cli

    def failing(spec, out, progress=None, devices=None, ray=None, ray_cpus=1):
        assert devices == "cpu,cpu" and ray is None
        return run_scaled(spec, out, progress, devices=devices, task=spawned.fail_second_population)

    monkeypatch.setattr(trajinv.sweep, "run_sweep", failing)
    res = CliRunner().invoke(cli.main, ["sweep", "--steps", "2", "--eval-every", "2", "--eval-seqs", "8", "--warmup",
                                        "1", "--lr", "0.01", "--lr", "0.02", "--wd", "0.5", "--batch-size", "4",
                                        "--population", "1", "--devices", "cpu,cpu", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert [r["status"] for r in _table(tmp_path)] == ["done", "failed"]
    assert f"bs4-p1 failed: {ERROR}" in res.output.splitlines()  # on the console as it happens, one line
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "1 population(s) failed (bs4-p1" in errors[0] and "rerun" in errors[0]


@pytest.mark.parametrize("devices, match", [("cpu,gpu", "'gpu'"), ("cpu,cuda:0", "mixes"), ("", "empty")])
def test_bad_device_lists_are_one_line_errors(tiny_train_config, tmp_path, devices, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(_spec(tiny_train_config), tmp_path, devices=devices)
    assert not (tmp_path / "spec.json").exists()


def test_devices_and_ray_exclude_each_other(tiny_train_config, tmp_path):
    with pytest.raises(ValueError, match="--devices or --ray, not both"):
        run_sweep(_spec(tiny_train_config), tmp_path, devices="cpu", ray="auto")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _parent_with_a_sleeping_worker(tmp_path):
    """(parent process, its pool worker's pid): a LocalPool whose one worker sleeps 300 s; both killed after."""
    pidfile = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(spawned.__file__).parent)!r})
        import spawned
        from trajinv.parallel.pool import LocalPool
        if __name__ == "__main__":
            with LocalPool(["cpu"]) as pool:
                pool._executor(0).submit(spawned.record_pid_and_sleep, {str(pidfile)!r}).result()
        """)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent exited before its worker started"
            time.sleep(0.2)
        worker = int(pidfile.read_text())
        assert _alive(worker)
        yield parent, worker
    finally:
        parent.kill()
        if pidfile.exists() and pidfile.read_text() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    # kill -9 skips the pool's shutdown; a worker left running would keep writing into the sweep directory.
    with _parent_with_a_sleeping_worker(tmp_path) as (parent, worker):
        parent.kill()
        parent.wait()
        assert _gone_within(worker, 15), "the worker outlived its killed parent"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ctrl_c_on_the_parent_alone_stops_its_workers_at_once(tmp_path):
    # SIGINT to the driver only (not its process group): it printed "Aborted!", then waited for every
    # running population to train to its end before exiting (interpreter exit joins the workers)
    with _parent_with_a_sleeping_worker(tmp_path) as (parent, worker):
        parent.send_signal(signal.SIGINT)
        parent.wait(timeout=30)  # the worker sleeps 300 s: a parent waiting for it times out here
        assert _gone_within(worker, 15), "the worker outlived its interrupted parent"


def test_a_failed_populations_trainer_is_gone_before_the_device_cache_is_emptied(tiny_train_config, tmp_path,
                                                                                 monkeypatch):
    # the trainer stayed bound in run_job while _release_cuda emptied the cache: after an out-of-memory
    # failure the next population on that worker was sized and built beside the dead one's tensors
    import weakref

    from trajinv.parallel import worker
    from trajinv.train import Trainer

    made, seen = [], []
    build = Trainer.__init__

    def init(self, *args, **kw):
        build(self, *args, **kw)
        made.append(weakref.ref(self))

    def fail(self, progress=None, until=None):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(Trainer, "train", fail)
    monkeypatch.setattr(worker, "_release_cuda", lambda: seen.append([ref() is None for ref in made]))
    spec = _spec(tiny_train_config)
    run_id, cfg = spec.populations()[0]
    out = worker.run_job(worker.Job(run_id, cfg, str(tmp_path / run_id), spec.data), lambda kind, **info: None)
    assert out.error and "out of memory" in out.error
    assert seen == [[True]]


def test_cli_tune_a_failed_population_is_one_line_and_the_rerun_retries_it(tmp_path, monkeypatch):
    # a stage's failed population (a killed worker, out of memory) ended the tune in a traceback
    import trajinv.tune.runner
    from trajinv import cli

    def failing(spec, out, progress=None, devices=None, ray=None, ray_cpus=1):
        return run_scaled(spec, out, progress, devices=devices, task=spawned.fail_second_population)

    args = ["tune", "--steps", "2", "--eval-every", "2", "--eval-seqs", "8", "--warmup", "1", "--batch-size", "4",
            "--points", "3", "--zoom-points", "0", "--max-shifts", "0", "--check-factor", "2", "--max-rescans", "0",
            "--population", "1", "--devices", "cpu,cpu",
            "--out", str(tmp_path)]
    monkeypatch.setattr(trajinv.tune.runner, "run_sweep", failing)
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception  # not a RuntimeError
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "population(s) bs4-p1 failed" in errors[0] and "rerun" in errors[0]
    assert "Traceback" not in res.output
    monkeypatch.undo()
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 0, again.output
    assert "recommended:" in again.output


def test_a_population_out_of_memory_in_a_worker_names_itself_once(tiny_train_config, tmp_path):
    rows = run_scaled(_spec(tiny_train_config), tmp_path, devices="cpu,cpu", task=spawned.second_population_out_of_memory)
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    # its error.log shows where the allocation failed: torch's error is chained (raised in the with-block's exit)
    assert "in fail\n" in (tmp_path / "runs/bs4-p1/error.log").read_text()
    assert rows[1]["error"] == ("DeviceOutOfMemory: 1 member ran out of cpu memory in step 1 (CUDA out of memory. "
                                "Tried to allocate 8.00 GiB); train fewer members at once (--population of sweep and "
                                "tune) or use a smaller --micro-batch")


def test_after_an_out_of_memory_the_rerun_splits_the_untrained_members_anew(tiny_train_config, tmp_path):
    # bs4-p0 (2 members) trains on one worker while bs4-p1 runs out of memory on the other; the rerun with a
    # smaller --population keeps bs4-p0 and trains the rest in populations of 1 (it was refused)
    rows = run_scaled(_spec(tiny_train_config, population=2), tmp_path, devices="cpu,cpu",
                      task=spawned.second_population_out_of_memory)
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    rerun = run_sweep(_spec(tiny_train_config, population=1), tmp_path, devices="cpu,cpu")
    assert [(r["run_id"], r["status"]) for r in rerun] == [("bs4-p0", "done"), ("bs4-p0", "done"), ("bs4-p1", "done")]
    assert "error" not in _table(tmp_path)[0]
    sequential = run_sweep(_spec(tiny_train_config, population=1), tmp_path / "seq")
    assert [r["final_val_loss"] for r in rerun] == [r["final_val_loss"] for r in sequential]


@pytest.mark.parametrize("devices", [None, "cpu"])
def test_a_second_command_into_a_sweep_being_trained_is_refused_and_changes_nothing(tiny_train_config, tmp_path,
                                                                                     devices):
    # the same command started twice (two shells, a resubmitted job) wrote one metrics.jsonl from two
    # processes: lines ran into each other and the rerun dropped a population's metrics as half written
    spec, tried = _spec(tiny_train_config), []

    def files():  # with a worker (devices) the first command's population trains on meanwhile: its own files
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not (devices and "runs" in p.parts)}

    def second(kind, **info):
        if kind == "population" and not tried:
            before = files()
            with pytest.raises(ValueError, match=f"^{tmp_path} is in use: another trajinv command"):
                run_sweep(spec, tmp_path)  # what a second process does: another open of the directory
            tried.append(files() == before)

    run_sweep(spec, tmp_path, devices=devices, progress=second)
    assert tried == [True]
    run_sweep(spec, tmp_path)  # the lock went with the first command: a rerun reads it back
    assert [r["status"] for r in _table(tmp_path)] == ["done"] * 3
