"""Many nodes: each population a Ray task (`pip install 'trajinv[ray]'`, `--ray auto|local|ADDRESS`).

Each population is one Ray task asking for one GPU (`device cuda`) or `cpus` CPUs
(`device cpu`, torch threads set to match); Ray's scheduler places them as
resources free up. The task is `worker.run_job`, the same one the local pool
runs, so resume, failure rows and summary.csv behave as on one node.

**Shared storage, checked.** Tasks write checkpoints and metrics straight into
`--out`, so the output directory must be on storage every node sees (NFS, a
cluster file system, the same disk for a one-node cluster). We chose this over
streaming results back to the driver because resume is then the same as
locally (a rerun finds every checkpoint where the sequential sweep would) and a
killed driver loses nothing that finished. At start one probe task per alive
node (pinned there with `NodeAffinitySchedulingStrategy`) reads a token file the
driver wrote into `--out` and writes one of its own beside it; the driver then
reads those back. A node that cannot do either stops the sweep with a one-line
error naming it. The data source and token cache are passed to the tasks as
absolute paths: they too must be visible from every node (or the token cache
is rebuilt per node from the same source, which must then be the same there).

Progress events come back through a `ray.util.queue.Queue` (an actor) that the
driver drains while it waits for results: one progress display for the cluster.
Task failures (an exception, `ray.exceptions.OutOfMemoryError`, a crashed
worker) become the population's `failed` rows; `max_retries=0`, so a rerun of the
command is the retry, resuming from the last checkpoint.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from trajinv.config import DataConfig
from trajinv.parallel.worker import Job, Outcome, failed_outcome, run_job

PROBE = ".trajinv-storage-probe"


def import_ray():
    """The ray module; one line naming the extra that installs it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'trajinv[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """One-line error unless something accepts a TCP connection at `address` ('host:port' or
    'ray://host:port'; anything else is left to Ray). ray.init retries an unreachable address for
    minutes, printing only warnings (`--ray localhost:1` was still waiting after 300 s)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "localhost", int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ValueError(f"--ray {address}: nothing answers at {host or 'localhost'}:{port} ({why}); "
                         "is the cluster up (ray start --head) and the address right?") from None


def _probe_storage(out: str, token: str, node: str) -> str | None:
    """On one node: None if it reads the driver's token in `out` and writes its own; else why not."""
    path = Path(out) / f"{PROBE}-{token}"
    try:
        if path.read_text() != token:
            return f"sees a different {path.name}"
        (Path(out) / f"{PROBE}-{token}-{node}").write_text(socket.gethostname())
    except OSError as e:
        return f"cannot use it ({type(e).__name__}: {e.strerror or e})"
    return None


def _free(gpu: bool, cpus: int) -> int:
    from trajinv.parallel.memory import free_bytes

    if gpu:
        return free_bytes("cuda")
    return free_bytes("cpu") * cpus // (os.cpu_count() or 1)


def _train(task, job: Job, events, threads: int) -> Outcome:
    import torch

    if threads:
        torch.set_num_threads(threads)
    # run_job batches the per-step events, so each put (a call to the queue actor) is rare
    return task(job, lambda kind, **info: events.put((kind, info)))


class RayCluster:
    """Populations as Ray tasks on the cluster at `address` ('auto', 'local' for a new one-node instance,
    or 'ray://host:port' / 'host:port'); a Ray instance already started in this process is used as is."""

    def __init__(self, address: str, out: str | Path, cpus: int = 1, gpu: bool = False):
        if cpus < 1:
            raise ValueError(f"--ray-cpus must be >= 1, got {cpus}")
        self.address, self.out, self.cpus, self.gpu = address, Path(out), cpus, gpu
        self.ray = import_ray()
        self.owned = False

    def __enter__(self) -> RayCluster:
        ray = self.ray
        if not ray.is_initialized():
            kw = {"log_to_driver": False}
            if self.address == "local":
                ray.init(include_dashboard=False, **kw)
            else:
                check_reachable(self.address)
                try:
                    ray.init(address=self.address, **kw)
                except ValueError as e:  # Ray's "Invalid address format: foo": which option, it does not say
                    raise ValueError(f"--ray {self.address}: {str(e).strip()}; give auto, local or the head's "
                                     "address (host:port)") from None
                except ConnectionError as e:  # Ray's own text names its `ray.init(address=...)` / --address
                    if self.address != "auto":
                        raise
                    raise ValueError("--ray auto: no running Ray cluster found on this machine; start one "
                                     "(ray start --head) or pass --ray local for a one-node instance") from e
            self.owned = True
        self.resources = {"num_cpus": 1 if self.gpu else self.cpus, "num_gpus": 1 if self.gpu else 0}
        try:
            self.check_resources()
            self.check_storage()
        except BaseException:
            self.__exit__(None, None, None)  # `with` does not exit what failed to enter
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()
            self.owned = False

    def check_resources(self) -> None:
        """One-line error unless some node can run a task at all (Ray would leave it pending forever)."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        key, need = ("GPU", 1) if self.gpu else ("CPU", self.cpus)
        if not any(r.get(key, 0) >= need for r in nodes):
            have = max((r.get(key, 0) for r in nodes), default=0)
            raise ValueError(f"no Ray node has {need} {key}(s) for a population (the most is {have:g}); "
                             + ("train on CPU with --device cpu" if self.gpu else "lower --ray-cpus"))

    def check_storage(self) -> None:
        """One-line error unless every alive node can read and write `out` (the same directory)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        self.out.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        mine = self.out / f"{PROBE}-{token}"
        mine.write_text(token)
        probe = ray.remote(_probe_storage)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(self.out.resolve()), token, n["NodeID"][:12]) for n in nodes]
            for n, why in zip(nodes, ray.get(refs)):
                if why is None and not (self.out / f"{PROBE}-{token}-{n['NodeID'][:12]}").exists():
                    why = "writes somewhere the driver does not see"
                if why is not None:
                    raise ValueError(f"--out {self.out} is not on storage every Ray node sees: node "
                                     f"{n.get('NodeManagerAddress', n['NodeID'])} {why}")
        finally:
            for p in self.out.glob(f"{PROBE}-{token}*"):
                p.unlink(missing_ok=True)

    def workers(self) -> int:
        """Populations the alive nodes can train at once: their GPUs (a GPU task takes a CPU too), or their
        CPUs in tasks of `cpus`."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if self.gpu:
            return max(1, sum(int(min(r.get("GPU", 0), r.get("CPU", 0))) for r in nodes))
        return max(1, sum(int(r.get("CPU", 0) // self.cpus) for r in nodes))

    def free_bytes(self) -> int:
        """Free memory one task sees (from a probe task with a training task's resources)."""
        return self.ray.get(self.ray.remote(_free).options(**self.resources).remote(self.gpu, self.cpus))

    def portable(self, data: DataConfig) -> DataConfig:
        """The DataConfig with absolute paths: tasks on other nodes (or in Ray's own working
        directory) must open the same source and token cache as the driver."""
        from trajinv.data.tokens import cache_root

        source = data.source
        if Path(source).exists():
            source = str(Path(source).resolve())
        return replace(data, source=source, cache_dir=str(cache_root(data).resolve()))

    def run(self, jobs: Sequence[Job], on_event: Callable[..., None], on_done: Callable[[Outcome], None],
            task=run_job) -> None:
        """Submit every job as a task; call back per progress event and per finished population."""
        from ray.util.queue import Queue

        ray = self.ray
        events = Queue(actor_options={"num_cpus": 0})
        remote = ray.remote(_train).options(max_retries=0, **self.resources)
        threads = 0 if self.gpu else self.cpus
        refs = {remote.remote(task, job, events, threads): job for job in jobs}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
                self._drain(events, on_event)
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = e.cause if e.cause is not None else e
                        outcome = failed_outcome(job, f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}")
                    except ray.exceptions.RayError as e:  # a crashed worker, Ray's OOM killer, a lost node
                        lines = str(e).strip().splitlines()
                        outcome = failed_outcome(job, f"{type(e).__name__}: {lines[0] if lines else 'Ray task died'}")
                    on_done(outcome)
            self._drain(events, on_event)
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.kill(events.actor)

    @staticmethod
    def _drain(events, on_event: Callable[..., None]) -> None:
        n = events.qsize()
        if n:
            for kind, info in events.get_nowait_batch(n):
                on_event(kind, **info)
