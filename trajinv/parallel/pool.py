"""Every device of one node: one worker process per device entry, fed populations from a queue.

Each device entry gets its own single-worker `concurrent.futures.ProcessPoolExecutor`
(spawn context: CUDA cannot be forked), whose initializer pins the worker to its
device, cores and threads (`devices.pin`) before anything touches CUDA. The parent
keeps the pending populations in a deque and hands the next one to whichever
worker is idle; that is the whole scheduler. One executor per device, not one
shared pool, because a worker killed by a signal (an out-of-memory kill, say)
breaks its executor (`BrokenProcessPool`): only the population it was running
fails, and only that device's executor is restarted for the rest.

A worker outlives a parent killed by a signal that skips the executors' shutdown
(`kill PID`, the out-of-memory killer) and would go on training into the sweep
directory that the rerun resumes: two writers on one checkpoint. So each worker
watches its parent (`_exit_with_parent`) and exits within a second of losing it.

Progress events of every worker come through one multiprocessing queue and are
handed to the parent's single `progress` callback from the parent's own thread
(the loop that waits for results drains the queue), so one progress display
serves all workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from trajinv.parallel.devices import Placement, pin, placements
from trajinv.parallel.memory import free_bytes
from trajinv.parallel.worker import Job, Outcome, failed_outcome, run_job

Task = Callable[[Job, Callable[..., None]], Outcome]

_EVENTS = None  # the worker's end of the progress queue (set by _init)


def _init(place: Placement, events, parent: int, started, index: int) -> None:
    global _EVENTS
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    pin(place)
    _EVENTS = events
    # a worker that dies before this line died starting, not training; shared memory, not an event: a
    # queued event waits for the queue's feeder thread, and a worker killed at once never sent it
    started[index] = 1


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit this worker at once when its parent is gone (the module docstring says why); os._exit, not
    sys.exit: the training loop runs in the main thread and must not get to write another checkpoint."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _emit(kind: str, **info) -> None:
    _EVENTS.put((kind, info))


def _run(task: Task, job: Job) -> Outcome:
    return task(job, _emit)


def _free(device: str) -> int:
    return free_bytes(device)


def _stop_workers(ex: ProcessPoolExecutor) -> None:
    """SIGTERM the executor's worker processes (Python >= 3.14 has it as `terminate_workers`)."""
    stop = getattr(ex, "terminate_workers", None)
    if stop is not None:
        stop()
        return
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


class LocalPool:
    """Workers on this node's devices; `run` trains jobs on them and calls back per event and result."""

    def __init__(self, devices: Sequence[str]):
        self.places = placements(devices)
        self.ctx = mp.get_context("spawn")
        self.events = self.ctx.Queue()
        self.executors: list[ProcessPoolExecutor | None] = [None] * len(self.places)
        self.started = self.ctx.Array("b", len(self.places), lock=False)  # 1: worker i's process is up

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        for ex in self.executors:
            if ex is None:
                continue
            if exc[0] is not None:
                # abandoned (Ctrl-C on this process alone, an error): a shutdown lets a running population
                # train to its end, and interpreter exit waits for it, hours on a GPU. Stopped instead, as a
                # kill stops it: the rerun resumes from its last checkpoint.
                _stop_workers(ex)
            ex.shutdown(wait=exc[0] is None, cancel_futures=True)
        self.executors = [None] * len(self.places)

    def _executor(self, i: int) -> ProcessPoolExecutor:
        if self.executors[i] is None:
            self.started[i] = 0
            self.executors[i] = ProcessPoolExecutor(1, mp_context=self.ctx, initializer=_init,
                                                    initargs=(self.places[i], self.events, os.getpid(),
                                                              self.started, i))
        return self.executors[i]

    def workers(self) -> int:
        """Populations trained at once: one per `--devices` entry."""
        return len(self.places)

    def free_bytes(self) -> int:
        """Free memory of the tightest device, as each worker sees it (CPU workers share the RAM)."""
        cpu = [p for p in self.places if p.kind == "cpu"]
        if cpu:
            return free_bytes("cpu", share=len(cpu))
        futures = [self._executor(i).submit(_free, "cuda") for i in range(len(self.places))]
        sharing = [sum(q.device == p.device for q in self.places) for p in self.places]  # cuda:0,cuda:0
        return min(f.result() // n for f, n in zip(futures, sharing))

    def portable(self, data):
        """The DataConfig as workers see it: spawned workers share this process's cwd and environment."""
        return data

    def _drain(self, on_event: Callable[..., None]) -> None:
        while True:
            try:
                kind, info = self.events.get_nowait()
            except queue.Empty:
                return
            on_event(kind, **info)

    def _death(self, i: int) -> str:
        """Why worker `i`'s population failed when its process ended under it."""
        where = f"worker process on {self.places[i].device}"
        if self.started[i]:
            return f"{where} died while training (killed by a signal, e.g. out of memory)"
        # each spawned worker re-runs the top level of the parent's script: unguarded, that starts
        # the same sweep again (refused: the directory is in use) and the worker exits; so said, every
        # population read "killed by a signal, e.g. out of memory"
        return (f"{where} exited while starting, before it trained (its error is printed above); a script "
                "that trains on workers needs its top level under `if __name__ == '__main__':`")

    def run(self, jobs: Sequence[Job], on_event: Callable[..., None], on_done: Callable[[Outcome], None],
            task: Task = run_job) -> None:
        """Train every job; `on_event(kind, **info)` for progress, `on_done(outcome)` per population
        as it finishes (in completion order). A worker that dies fails only its own job."""
        pending = deque(jobs)
        running: dict[Future, tuple[int, Job]] = {}
        idle = deque(range(len(self.places)))
        while pending or running:
            while pending and idle:
                i, job = idle.popleft(), pending.popleft()
                running[self._executor(i).submit(_run, task, job)] = (i, job)
            done, _ = wait(running, timeout=0.1, return_when=FIRST_COMPLETED)
            self._drain(on_event)
            for fut in done:
                i, job = running.pop(fut)
                try:
                    outcome = fut.result()
                except BrokenProcessPool:
                    self.executors[i].shutdown(wait=False)
                    self.executors[i] = None  # a fresh worker for the rest
                    outcome = failed_outcome(job, self._death(i))
                except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be unpickled
                    outcome = failed_outcome(job, f"{type(e).__name__}: {e}")
                idle.append(i)
                on_done(outcome)
        self.__exit__(None, None, None)  # workers exit, flushing their last events into the queue
        self._drain(on_event)
