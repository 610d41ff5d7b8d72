"""Runs the trajinv CLI in a process that SIGKILLs itself at a chosen point (tests/test_kill.py).

The product has no test hooks: this driver wraps product functions from the outside
at the chosen point and kills its own process there with SIGKILL (no cleanup, no
`finally`, no flush: what a power cut or the OOM killer leaves, minus the page cache).

Kill specs (JSON objects; `n` counts the calls that match, from 1):

    {"at": "replace", "match": GLOB, "n": N, "when": "before"|"after"}
        the N-th os.replace whose destination's name matches GLOB: before or after the rename
    {"at": "unlink", "match": GLOB, "n": N, "when": "before"|"after"}
        the N-th Path.unlink of a matching name (checkpoint pruning)
    {"at": "write", "match": GLOB, "n": N, "frac": F}
        inside the N-th trajinv.atomic.atomic_write to a matching name: F of the data
        written to the temporary file, then the kill
    {"at": "metrics", "n": N, "frac": F}
        inside the N-th Trainer._write_metrics: F of its lines' bytes written, then the kill
    {"at": "tokenize"}
        inside the first tokenization (its scratch folder exists)
    {"at": "timer", "seconds": S}
        S seconds after the CLI starts

Modes:

    python tests/kill_driver.py run JOB      one job (JSON: args, kill, cwd, env, max_file_bytes) here
    python tests/kill_driver.py serve        import once, then fork a child per JSON job line on
                                             stdin and answer each with {"rc": exit status}

`serve` saves the ~3 s of imports per run: the children are forked before any torch op
has run in the server (no thread pools exist yet), so they are ordinary processes.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import pathlib
import signal
import sys
import threading


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _import_product() -> None:
    import trajinv.atomic  # noqa: F401
    import trajinv.checkpoint  # noqa: F401
    import trajinv.cli  # noqa: F401
    import trajinv.data  # noqa: F401
    import trajinv.data.tokens  # noqa: F401
    import trajinv.sweep  # noqa: F401
    import trajinv.train  # noqa: F401


def _install(spec: dict) -> None:
    """Wrap the product function `spec` names so that it kills this process at the chosen call."""
    at, count = spec["at"], [0]

    def hit(name: str) -> bool:
        if not fnmatch.fnmatch(name, spec.get("match", "*")):
            return False
        count[0] += 1
        return count[0] == spec.get("n", 1)

    if at == "replace":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            chosen = hit(os.path.basename(os.fspath(dst)))
            if chosen and spec["when"] == "before":
                _die()
            real_replace(src, dst, *a, **kw)
            if chosen:
                _die()

        os.replace = replace
    elif at == "unlink":
        real_unlink = pathlib.Path.unlink

        def unlink(self, *a, **kw):
            chosen = hit(self.name)
            if chosen and spec["when"] == "before":
                _die()
            real_unlink(self, *a, **kw)
            if chosen:
                _die()

        pathlib.Path.unlink = unlink
    elif at == "write":
        import trajinv.atomic

        real_atomic_write = trajinv.atomic.atomic_write

        def atomic_write(path, write, *a, **kw):
            if not hit(pathlib.Path(path).name):
                return real_atomic_write(path, write, *a, **kw)

            def partial(f):
                buf = io.BytesIO() if "b" in kw.get("mode", a[0] if a else "wb") else io.StringIO()
                write(buf)
                data = buf.getvalue()
                f.write(data[: int(len(data) * spec["frac"])])
                f.flush()
                _die()

            return real_atomic_write(path, partial, *a, **kw)

        for mod in list(sys.modules.values()):  # every module that imported the name
            if getattr(mod, "__name__", "").startswith("trajinv") and \
                    getattr(mod, "atomic_write", None) is real_atomic_write:
                mod.atomic_write = atomic_write
    elif at == "metrics":
        from trajinv.metrics import MetricsLog

        real_write = MetricsLog.write

        def write(self, records):
            if not hit("metrics"):
                return real_write(self, records)
            text = "".join(json.dumps(rec) + "\n" for rec in records)
            self._f.write(text[: int(len(text) * spec["frac"])])
            self._f.flush()
            _die()

        MetricsLog.write = write
    elif at == "tokenize":
        import trajinv.data.tokens as tokens

        def _tokenize(*a, **kw):
            _die()

        tokens._tokenize = _tokenize
    elif at == "timer":
        timer = threading.Timer(spec["seconds"], _die)
        timer.daemon = True
        timer.start()
    else:
        raise SystemExit(f"unknown kill point {at!r}")


def run(job: dict) -> None:
    """Run the CLI with job["args"] in job["cwd"] (env overrides job["env"]), killed per job["kill"];
    job["max_file_bytes"] makes every larger file write fail (EFBIG), as a full disk would."""
    os.chdir(job.get("cwd", "."))
    os.environ.update(job.get("env", {}))
    if job.get("max_file_bytes"):
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["max_file_bytes"], resource.RLIM_INFINITY))
    _import_product()
    if job.get("kill"):
        _install(job["kill"])
    from trajinv.cli import main

    main(job["args"], prog_name="trajinv", standalone_mode=True)


def serve() -> None:
    _import_product()
    # what the children would import on their first step (torch.optim pulls in torch._dynamo:
    # seconds); imports only, no torch op: no thread pool exists when the server forks
    import datasets  # noqa: F401 - the children tokenize and load through it
    import numpy  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.utils.cpp_extension  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        log = job.get("log", os.devnull)
        pid = os.fork()
        if pid == 0:  # the child: output to the job's log, then the run; never returns here
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdin.close()
                run(job)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - report it in the log, as an uncaught error would
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(json.loads(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
