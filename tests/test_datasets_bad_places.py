"""prepare into a full or read-only filesystem: one error line naming the directory, the old
dataset still valid and nothing left behind. Real filesystems: a small tmpfs per test (the tests
run as root here; where mounting is refused they skip, printing why)."""

import shutil
import subprocess

import numpy as np
import pytest
from trainer_harness import one_error_line, run_module

from datasets import writer
from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare


def _cli(*args):
    return run_module("datasets.prepare", *args, timeout=120)


def _one_error_line(result, *words):
    return one_error_line(result, 1, *words)


@pytest.fixture
def inputs(make_idx_dir):
    """(small, big): IDX inputs of about 40 kB and 3.3 MB of shards."""
    rng = np.random.default_rng(0)
    small = make_idx_dir(
        (rng.integers(0, 256, (500, 8, 8), dtype=np.uint8), np.arange(500) % 4), name="small"
    )
    big = make_idx_dir(
        (rng.integers(0, 256, (4000, 28, 28), dtype=np.uint8), np.arange(4000) % 10), name="big"
    )
    return small, big


def _used(directory):
    return shutil.disk_usage(directory).total - shutil.disk_usage(directory).free


def test_overwrite_that_does_not_fit_is_refused_before_writing(
    tmp_path, inputs, tmpfs, tree_snapshot
):
    small, big = inputs
    with tmpfs(tmp_path / "disk", "3m") as disk:
        out = f"{disk}/out"
        prepare("idx", small, out, num_shards=4)
        before, used = tree_snapshot(out), _used(disk)
        result = _cli("--source=idx", f"--input={big}", f"--output_dir={out}", "--overwrite")
        line = _one_error_line(result, f"error: {out}: needs about ", " bytes free")
        needed = int(line.split("needs about ")[1].split()[0])
        free = int(line.split(", ")[1].split()[0])
        assert needed > free and needed > 3_000_000
        assert tree_snapshot(out) == before and _used(disk) == used
        assert DatasetMetadata.load(out).num_examples("train") == 500


def test_a_disk_that_fills_up_while_writing_keeps_the_old_dataset(
    tmp_path, inputs, tmpfs, tree_snapshot, monkeypatch
):
    small, big = inputs
    with tmpfs(tmp_path / "disk", "3m") as disk:
        out = f"{disk}/out"
        old = prepare("idx", small, out, num_shards=4)
        before, used = tree_snapshot(out), _used(disk)
        # Another process takes the space between the check and the write: the check sees the
        # disk as it was, the write meets the real full disk.
        real = shutil.disk_usage
        monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
        with pytest.raises(DataError) as e:
            prepare("idx", big, out, num_shards=4, overwrite=True)
        monkeypatch.setattr(writer.shutil, "disk_usage", real)
        assert str(e.value).startswith(
            f"{out}: writing the new shards failed (No space left on device)"
        )
        assert "untouched" in str(e.value) and "\n" not in str(e.value)
        # Nothing left behind (the staging directory is gone, the space is free again), and the
        # old dataset is still the dataset.
        assert tree_snapshot(out) == before and _used(disk) == used
        assert DatasetMetadata.load(out) == old
        assert prepare("idx", small, out, num_shards=4) == old  # up to date, as before


def test_read_only_output_dir_is_one_line(tmp_path, inputs, tmpfs, tree_snapshot):
    small, big = inputs
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = _cli("--source=idx", f"--input={small}", f"--output_dir={read_only}/out")
        _one_error_line(result, f"{read_only}/out", "read-only file system")
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = f"{disk}/out"
        prepare("idx", small, out, num_shards=2)
        before = tree_snapshot(out)
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        # An up-to-date dataset on a read-only disk is fine to "prepare" again: nothing to do.
        again = _cli("--source=idx", f"--input={small}", f"--output_dir={out}", "--num_shards=2")
        assert again.returncode == 0, again.stderr
        result = _cli("--source=idx", f"--input={big}", f"--output_dir={out}", "--overwrite")
        _one_error_line(result, out, "read-only file system")
        assert tree_snapshot(out) == before
