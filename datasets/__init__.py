"""convoy datasets: raw sources -> sharded TFRecords + metadata.json, and the tf.data input pipeline.

Modules (each owns one thing; nothing is imported here, so `import datasets` stays cheap):
- `prepare`: the `prepare()` function and the `python -m datasets.prepare` CLI.
- `idx`, `csv_pixels`, `image_folder`, `tfds_source`: one reader per kind of source.
- `source_data`: the in-memory form readers hand to the writer; `writer`: shards + metadata on disk.
- `metadata`: the metadata.json contract; `errors`: `DataError`; `progress`: progress lines.
- `pipeline`: `input_fn`, `normalize`, `eval_batches_per_worker`; `augment`: augmentation ops.
- `embedded`: the MNIST sample shipped in `sample/mnist/`, prepared on demand by `sample_data_dir()`.
"""
