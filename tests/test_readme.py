"""The README's Python examples run as written (the analysis one reads a sweep in
runs/grid: it runs against a small sweep made here)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, tiny_data):
    code = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    if "runs/grid" in code:
        from trajinv.config import TrainConfig, preset
        from trajinv.data import DataConfig
        from trajinv.sweep import SweepSpec, run_sweep

        spec = SweepSpec(train=TrainConfig(model=preset("tiny"), steps=8, eval_every=4, eval_seqs=8),
                         data=DataConfig(max_tokens=200_000), lrs=(4e-3, 8e-3), wds=(0.5, 1.0), batch_sizes=("8",))
        run_sweep(spec, "runs/grid")
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
