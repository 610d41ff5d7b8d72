"""Test-wide set-up: Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it
is set here, before the test modules import trajinv.kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
from helpers import metrics_without_time  # noqa: E402

# Token caches of the whole session go to one scratch folder, never the repo, removed when the session ends
# (pytest-xdist workers inherit the variable from the process that made the folder, and leave it be).
if "TRAJINV_CACHE" not in os.environ:
    os.environ["TRAJINV_CACHE"] = tempfile.mkdtemp(prefix="trajinv-cache-")
    atexit.register(shutil.rmtree, os.environ["TRAJINV_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data():
    """A small slice of the embedded stdlib corpus, tokenized once per session."""
    from trajinv.data import DataConfig, load_data

    return load_data(DataConfig(max_tokens=200_000))


@pytest.fixture
def tiny_train_config():
    """A TrainConfig small enough for a few CPU steps per test."""
    from trajinv.config import Member, ModelConfig, OptimConfig, TrainConfig

    def make(**kw):
        base = dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16),
                    members=(Member(1e-2, 0.1), Member(2e-2, 0.5)), steps=8, batch_size="4",
                    optim=OptimConfig(name="torch"), eval_every=4, eval_seqs=8, log_every=1, checkpoint_every=3)
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture
def interrupted_run(tiny_data):
    """Train to step `stop_at` as if killed right after it, resume in a fresh Trainer, finish.

    Returns (step the resume started from, metrics without wall-clock seconds).
    """
    from trajinv.train import Trainer

    def run(cfg, run_dir, stop_at):
        Trainer(cfg, tiny_data, run_dir).train(until=stop_at)
        resumed = Trainer(cfg, tiny_data, run_dir)
        assert resumed.resume()
        start = resumed.step
        resumed.train()
        return start, metrics_without_time(run_dir)

    return run
