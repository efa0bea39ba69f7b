"""convoy datasets: raw sources -> sharded TFRecords + metadata.json, and the tf.data input pipeline."""
