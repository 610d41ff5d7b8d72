"""atomic_write: the mode open() would give, pid-tagged temporary files, stale ones removed."""

import errno
import os
import stat

import pytest

from trajinv.atomic import atomic_write, remove_stale_temps, writer_pid


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_the_mode_open_would_give(tmp_path, umask_022):
    atomic_write(tmp_path / "a.json", lambda f: f.write("{}"), mode="w")
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.json") == 0o644


def test_umask_is_respected_and_an_existing_file_keeps_its_mode(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "private", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600
    (tmp_path / "shared").write_text("old")
    os.chmod(tmp_path / "shared", 0o664)
    atomic_write(tmp_path / "shared", lambda f: f.write("new"), mode="w")
    assert _mode(tmp_path / "shared") == 0o664 and (tmp_path / "shared").read_text() == "new"


def test_a_failed_write_names_the_file_and_leaves_the_old_one(tmp_path):
    (tmp_path / "summary.csv").write_text("old")

    def full_disk(f):
        f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "summary.csv", full_disk, mode="w")
    assert e.value.filename == str(tmp_path / "summary.csv")
    assert os.listdir(tmp_path) == ["summary.csv"] and (tmp_path / "summary.csv").read_text() == "old"


def test_temporary_names_carry_the_writer_pid(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.bin", lambda f: seen.extend(os.listdir(tmp_path)))
    assert seen[0].startswith(".x.bin.") and seen[0].endswith(".tmp") and writer_pid(seen[0]) == os.getpid()
    assert writer_pid(".x.bin.abcdefgh.tmp") is None and writer_pid("x.bin") is None


def test_remove_stale_temps_spares_running_writers(tmp_path):
    stale = tmp_path / ".a.json.999999999.abcdefgh.tmp"
    stale.write_text("{")
    live = tmp_path / f".a.json.{os.getppid()}.abcdefgh.tmp"
    live.write_text("{")
    other = tmp_path / ".b.csv.999999999.abcdefgh.tmp"
    other.write_text("x")
    assert remove_stale_temps(tmp_path, "a.json") == [stale]
    assert live.exists() and other.exists()
