"""Bad input, second round (issue #22): no file outside the dataset directory is touched, no
silent no-op, no traceback.

One subprocess test per case: each builds the bad case for real, runs the real CLI and checks the
exit code, the one `error:` line naming the file, flag or layer, the absence of a traceback, and
(for the dataset directory) that a file outside it is still there byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from trainer_harness import FAST_FLAGS, run_module, run_trainer


def _one_error_line(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# --- 1. prepare, verify and the trainer stay inside the dataset directory ----------------------


@pytest.fixture
def small_input(make_idx_dir):
    rng = np.random.default_rng(0)
    return make_idx_dir((rng.integers(0, 256, (40, 4, 4), dtype=np.uint8), np.arange(40) % 4))


def _point_a_shard_at(out, entry):
    """Edits OUT/metadata.json so that its first train shard entry reads `entry`."""
    path = os.path.join(out, "metadata.json")
    raw = json.load(open(path))
    raw["splits"]["train"]["shards"][0]["file"] = entry
    open(path, "w").write(json.dumps(raw))
    return path


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_shard_entry_outside_the_dataset_deletes_nothing(
    where, tmp_path, small_input, tree_snapshot
):
    out = str(tmp_path / "out")
    prepare_args = ("--source=idx", f"--input={small_input}", f"--output_dir={out}")
    assert run_module("datasets.prepare", *prepare_args, "--num_shards=2").returncode == 0
    decoy = tmp_path / "decoy" / ("v3.txt" if where == "relative" else "victim2.tfrecord")
    decoy.parent.mkdir()
    decoy.write_bytes(b"somebody else's file\n")
    entry = "../decoy/v3.txt" if where == "relative" else str(decoy)
    metadata = _point_a_shard_at(out, entry)
    before = tree_snapshot(out)
    for extra in ((), ("--overwrite",)):
        result = run_module("datasets.prepare", *prepare_args, "--num_shards=2", *extra)
        _one_error_line(result, 1, metadata, repr(entry), "expected a plain file name")
        assert "ready" not in result.stderr + result.stdout
    verified = run_module("datasets.verify", f"--data_dir={out}", timeout=120)
    _one_error_line(verified, 2, metadata, repr(entry))
    trained = run_trainer(
        *FAST_FLAGS, f"--data_dir={out}", f"--workdir={tmp_path / 'run'}", check=False, timeout=120
    )
    _one_error_line(trained, 2, metadata, repr(entry))
    assert decoy.read_bytes() == b"somebody else's file\n"
    assert tree_snapshot(out) == before


def test_a_shard_that_is_a_symlink_outside_the_dataset_is_not_deleted(
    tmp_path, small_input, idx_writer
):
    out = str(tmp_path / "out")
    prepare_args = ("--source=idx", f"--input={small_input}", f"--output_dir={out}")
    assert run_module("datasets.prepare", *prepare_args, "--num_shards=2").returncode == 0
    victim = tmp_path / "elsewhere" / "victim.tfrecord"
    victim.parent.mkdir()
    victim.write_bytes(b"not prepare's\n")
    listed = json.load(open(os.path.join(out, "metadata.json")))["splits"]["train"]["shards"]
    shard = os.path.join(out, listed[0]["file"])
    os.remove(shard)
    os.symlink(victim, shard)
    # A different source forces a rewrite that would drop the old shards.
    other = tmp_path / "other"
    shutil.copytree(small_input, other)
    idx_writer(str(other / "train-labels-idx1-ubyte.gz"), np.arange(40) % 2)
    args = ("--source=idx", f"--input={other}", f"--output_dir={out}", "--overwrite")
    result = run_module("datasets.prepare", *args)
    _one_error_line(result, 1, os.path.basename(shard), "symlink", str(victim))
    assert os.path.islink(shard) and victim.read_bytes() == b"not prepare's\n"
