"""How the examples of a split are divided among the workers that train on it, without TensorFlow.

Each example belongs to exactly one worker's share. By file when the split's shard count is a
multiple of the worker count: worker w reads shards w, w + W, w + 2W, ... (shards/W files; every
record is read once). Otherwise by record: every worker reads all shards in their metadata.json
order and keeps records w, w + W, ... of that one fixed stream (W times the reads of file
sharding). Dealing files round-robin whatever the counts would give workers unequal shares, and
as all workers take the same number of steps, 16 shards on 12 workers would train the examples of
8 shards twice as often as those of the other 8. `datasets.pipeline` reads what this decides; the
Kubernetes manifest tests check the shipped shard and worker counts with it.
"""

from __future__ import annotations

import dataclasses
import math

from datasets.metadata import DatasetMetadata


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How the examples of one split are divided among `num_workers` workers, each to one worker.

    By file when the shard count is a multiple of the worker count: worker w reads shards
    w, w + W, w + 2W, ... (every record is read once). Otherwise by record: every worker reads all
    shards in their metadata.json order and keeps records w, w + W, ... of that one fixed stream.
    """

    dataset: str
    split: str
    shard_sizes: tuple[int, ...]  # examples per shard, in metadata.json order
    num_workers: int

    @property
    def num_files(self) -> int:
        return len(self.shard_sizes)

    @property
    def by_file(self) -> bool:
        return self.num_files % self.num_workers == 0

    def shards(self, worker_index: int) -> range:
        """Indices of the shards `worker_index` reads."""
        if self.by_file:
            return range(worker_index, self.num_files, self.num_workers)
        return range(self.num_files)

    def num_examples(self, worker_index: int) -> int:
        """Examples in the share of `worker_index`: one epoch of its training input."""
        if self.by_file:
            return sum(self.shard_sizes[i] for i in self.shards(worker_index))
        return len(range(worker_index, sum(self.shard_sizes), self.num_workers))

    def describe(self) -> str:
        """One line: which sharding, and what it costs in reads."""
        files, workers = self.num_files, self.num_workers
        head = (
            f"split '{self.split}' of {self.dataset}: {files} "
            f"file{'s' if files != 1 else ''} on {workers} worker{'s' if workers != 1 else ''}"
        )
        if self.by_file:
            return (
                f"{head}: sharded by file, each worker reads {files // workers} of them "
                "(every record read once)"
            )
        return (
            f"{head}: sharded by record, every worker reads all {files} files and keeps 1 "
            f"record in {workers}: {workers}x the reads of file sharding; "
            f"{self._advice()}"
        )

    def _advice(self) -> str:
        # prepare caps the shard count at the split's size, so suggest a count it can write.
        total, workers = sum(self.shard_sizes), self.num_workers
        if total < workers:
            return f"the split has {total} examples, fewer than the workers: some get none"
        suggested = math.ceil(self.num_files / workers) * workers
        if suggested > total:
            suggested = total // workers * workers
        return (
            f"prepare with --num_shards={suggested} (or another multiple of {workers}) "
            "to shard by file"
        )


def sharding(metadata: DatasetMetadata, split: str, num_workers: int) -> Sharding:
    """How `split` is divided among `num_workers` workers (see `Sharding`)."""
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: expected at least one worker")
    metadata.shard_paths("", split)  # raises DataError naming the split when unknown
    return Sharding(
        dataset=metadata.name,
        split=split,
        shard_sizes=tuple(shard.num_examples for shard in metadata.splits[split].shards),
        num_workers=num_workers,
    )
