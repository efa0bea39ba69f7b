"""convoy datasets: raw sources -> sharded TFRecords + metadata.json, and the tf.data input pipeline.

Modules (each owns one thing; nothing is imported here until used, so `import datasets` stays
cheap; `datasets.write_arrays` loads `arrays` on first use):
- `prepare`: the `prepare()` function and the `python -m datasets.prepare` CLI.
- `arrays`: `write_arrays(images, labels, output_dir, ...)`, numpy arrays -> a prepared dataset.
- `verify`: the `python -m datasets.verify` CLI, the corrupt-shard locator, pre-training checks.
- `idx`, `csv_pixels`, `image_folder`, `tfds_source`, `npz`, `tfrecord_source`: one reader per
  kind of source (`tfrecord_source`: TFRecords users already have, TF-Slim's ImageNet layout).
- `source_data`: the in-memory form readers hand to the writer (and `from_arrays`, the array checks
  of `arrays` and `npz`); `writer`: shards + metadata on disk.
- `metadata`: the metadata.json contract; `errors`: `DataError`; `progress`: progress lines;
  `tfrecord`: TFRecord framing and checksums with numpy.
- `pipeline`: `input_fn`, `normalize`, `eval_batches_per_worker`; `augment`: augmentation ops;
  `crop`: the random-resized crop (training) and the central crop (evaluation, export);
  `sharding`: which worker reads which shards or records of a split (no TensorFlow).
- `embedded`: the MNIST sample shipped in `sample/mnist/`, prepared on demand by `sample_data_dir()`.
"""

__all__ = ["write_arrays"]


def __getattr__(name):
    if name == "write_arrays":
        from datasets.arrays import write_arrays

        return write_arrays
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
