"""The embedded MNIST sample (`datasets/sample/mnist/`, 8,000 train + 2,000 test real images).

It is the default dataset of the trainer and of the tests, so convoy runs with no network and no
external data. `sample_data_dir()` prepares it into TFRecords once, in a cache directory, and
returns that directory; later calls (and concurrent ones: the prepare lock serializes them) find
it up to date and return at once.
"""

from __future__ import annotations

import os

from datasets import prepare as prepare_lib
from datasets.errors import OutputExistsError

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "mnist")
# By-file sharding for 1, 2, 4 or 8 workers (other counts shard by record), few enough files to
# stay quick to write.
NUM_SHARDS = 8
SPLITS = {"train": 8000, "test": 2000}


def default_cache_dir() -> str:
    """`$CONVOY_CACHE` when set, else `~/.cache/convoy/mnist_sample`."""
    return os.environ.get("CONVOY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "convoy", "mnist_sample"
    )


def sample_data_dir(cache_root: str | None = None) -> str:
    """Prepares the sample (if not already up to date) into `cache_root` and returns that data_dir.

    `cache_root` defaults to `default_cache_dir()`. Splits: train (8,000), test (2,000).
    """
    data_dir = cache_root or default_cache_dir()
    try:
        prepare_lib.prepare("idx", SAMPLE_DIR, data_dir, num_shards=NUM_SHARDS, seed=0)
    except OutputExistsError:
        # The cache holds an older sample or other options: it is ours to replace.
        prepare_lib.prepare(
            "idx", SAMPLE_DIR, data_dir, num_shards=NUM_SHARDS, seed=0, overwrite=True
        )
    return data_dir
