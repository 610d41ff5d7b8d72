"""Populations as Ray tasks on a local instance (ray.init(num_cpus=2)): the sequential sweep's numbers,
failures as rows, resume by rerun, the shared-storage check."""

import csv
import os
import sys
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'trajinv[ray]'")

from trajinv.config import OptimConfig  # noqa: E402
from trajinv.data import DataConfig  # noqa: E402
from trajinv.parallel.cluster import PROBE, RayCluster, _probe_storage, check_reachable  # noqa: E402
from trajinv.parallel.runner import run_scaled  # noqa: E402
from trajinv.sweep import SweepSpec, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # Ray renices its workers to 15: beside the other pytest-xdist worker's training on 2 cores they got
    # next to no CPU, and a 4-step sweep took 5-10 minutes of wall time for 24 s of CPU. Read by the raylet
    # that ray.init starts, so set before it, and put back after.
    old = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    finally:
        if old is None:
            del os.environ["RAY_worker_niceness"]
        else:
            os.environ["RAY_worker_niceness"] = old
    # tasks from this module are shipped by value: Ray workers cannot import test modules by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _spec(tiny_train_config):
    return SweepSpec(train=tiny_train_config(steps=4, checkpoint_every=2, optim=OptimConfig(name="fused")),
                     data=DataConfig(max_tokens=200_000), lrs=(0.01, 0.02), wds=(0.5, 1.0), batch_sizes=("4",),
                     population=2)


def _table(path):
    with open(path / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_a_sweep_through_ray_gives_the_sequential_numbers(local_ray, tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    run_sweep(spec, tmp_path / "seq")
    events = []
    rows = run_sweep(spec, tmp_path / "ray", ray="auto", progress=lambda kind, **i: events.append((kind, i)))
    assert [r["status"] for r in rows] == ["done"] * 4
    assert _table(tmp_path / "ray") == _table(tmp_path / "seq")
    assert sum(i["steps"] for k, i in events if k == "advance") == 8  # progress came back through the queue
    assert not list((tmp_path / "ray").glob(f"{PROBE}*"))  # the storage probe cleaned up


def test_without_population_the_members_are_spread_over_the_clusters_slots(local_ray, tiny_train_config,
                                                                           tmp_path):
    assert RayCluster("auto", tmp_path, cpus=1).workers() == 2  # ray.init(num_cpus=2): two one-CPU tasks at once
    assert RayCluster("auto", tmp_path, cpus=2).workers() == 1
    rows = run_sweep(replace(_spec(tiny_train_config), population=0), tmp_path / "ray", ray="auto")
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p0", "bs4-p1", "bs4-p1"]


def test_a_gpu_task_takes_a_cpu_too_so_a_node_runs_no_more_than_its_cpus():
    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"GPU": 8.0, "CPU": 2.0}},
                    {"Alive": True, "Resources": {"GPU": 1.0, "CPU": 4.0}},
                    {"Alive": False, "Resources": {"GPU": 8.0, "CPU": 64.0}},
                    {"Alive": True, "Resources": {"GPU": 0.5, "CPU": 8.0}}]

    cluster = RayCluster.__new__(RayCluster)
    cluster.ray, cluster.gpu, cluster.cpus = FakeRay, True, 1
    assert cluster.workers() == 3  # 2 + 1 + 0: half a GPU runs no whole task
    cluster.gpu, cluster.cpus = False, 3
    assert cluster.workers() == 0 + 1 + 2


def fail_first(job, emit):
    from trajinv.parallel.worker import run_job

    if job.run_id.endswith("-p0"):
        raise RuntimeError("injected")
    return run_job(job, emit)


def test_a_failed_task_is_a_row_and_a_rerun_resumes_only_it(local_ray, tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    rows = run_scaled(spec, tmp_path, ray="auto", task=fail_first)
    assert [(r["run_id"], r["status"]) for r in rows] == [("bs4-p0", "failed")] * 2 + [("bs4-p1", "done")] * 2
    assert rows[0]["error"] == "RuntimeError: injected"
    events = []
    run_sweep(spec, tmp_path, ray="auto", progress=lambda kind, **i: events.append((kind, i)))
    assert {i["run_id"]: i["skipped"] for k, i in events if k == "population"} == {"bs4-p0": False, "bs4-p1": True}
    assert [r["status"] for r in _table(tmp_path)] == ["done"] * 4


def test_storage_probe_names_what_a_node_cannot_do(tmp_path):
    (tmp_path / f"{PROBE}-tok").write_text("tok")
    assert _probe_storage(str(tmp_path), "tok", "n1") is None and (tmp_path / f"{PROBE}-tok-n1").exists()
    (tmp_path / f"{PROBE}-tok").write_text("other")
    assert "sees a different" in _probe_storage(str(tmp_path), "tok", "n1")
    assert "cannot use it (FileNotFoundError" in _probe_storage(str(tmp_path / "elsewhere"), "tok", "n1")


def test_a_node_that_writes_elsewhere_fails_the_check_in_one_line(local_ray, tmp_path, monkeypatch):
    """A node whose probe succeeds on its own disk but whose file the driver cannot see (the same path on
    unshared storage): simulated by a probe that reports success without writing."""
    import trajinv.parallel.cluster as cluster

    monkeypatch.setattr(cluster, "_probe_storage", lambda out, token, node: None)
    with pytest.raises(ValueError, match="not on storage every Ray node sees: node .* writes somewhere") as e:
        with RayCluster("auto", tmp_path):
            pass
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob(f"{PROBE}*"))


@pytest.mark.parametrize("kw, match", [(dict(cpus=3), "no Ray node has 3 CPU"), (dict(gpu=True), "has 1 GPU")])
def test_tasks_no_node_can_run_fail_in_one_line(local_ray, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        with RayCluster("auto", tmp_path, **kw):
            pass
    assert ray.is_initialized()  # a Ray instance this process did not start is left running


def test_an_address_where_nothing_answers_is_one_line_not_a_hang(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        start = time.perf_counter()
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(ValueError, match=f"nothing answers at 127.0.0.1:{port}"):
                check_reachable(address)
        if not ray.is_initialized():  # through the sweep's entry point (a started instance is used as is)
            with pytest.raises(ValueError, match="nothing answers"):
                RayCluster(f"127.0.0.1:{port}", tmp_path / "out").__enter__()
            assert not (tmp_path / "out").exists()
        assert time.perf_counter() - start < 60
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: Ray's turn
    check_reachable("auto")  # not an address: Ray resolves it


def test_auto_without_a_running_cluster_is_one_line_in_our_terms(tmp_path, monkeypatch):
    # Ray's own message tells the user to set an `--address` flag, which trajinv does not have
    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ValueError, match=r"^--ray auto: no running Ray cluster found .* --ray local") as e:
        RayCluster("auto", tmp_path).__enter__()
    assert "--address" not in str(e.value)


@pytest.mark.parametrize("address, match", [("", r"^--ray '' is empty; give auto, local"),
                                            (" ", r"^--ray ' ' is empty"),
                                            ("foo", r"^--ray foo: Invalid address format: foo; give auto, local")])
def test_an_address_ray_cannot_read_is_one_line_naming_the_option(tmp_path, tiny_train_config, address, match,
                                                                   monkeypatch):
    # `--ray ''` said only "Invalid address format:", naming neither the option nor the (empty) value
    if address == "foo" and ray.is_initialized():  # an earlier test's Ray, used as is: the address is never read
        def invalid(address, **kw):  # Ray's own refusal, word for word, as a fresh process gets it
            raise ValueError(f"Invalid address format: {address}")

        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", invalid)
    with pytest.raises(ValueError, match=match):
        run_sweep(_spec(tiny_train_config), tmp_path / "out", ray=address)
    assert not (tmp_path / "out").exists()
