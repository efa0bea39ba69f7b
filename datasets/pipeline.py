"""The tf.data input pipeline: prepared shards -> per-replica batches for one worker.

Training: this worker's share of the shards, files read in parallel (in chunks), records shuffled
(seeded) while still serialized (cheap to buffer), repeated forever, then batched and decoded per
batch (one `parse_example` + `decode_raw` per batch instead of per example: with the chunked file
reads, that is what gives ~200k MNIST images/s on two cores), augmented, prefetched.

Batches leave the pipeline as uint8 pixels, a quarter of float32's bytes to copy to the device;
the train and eval steps normalize them inside the compiled step (`model_input`), with the same
`normalize` the export applies. Augmented batches (augmentation runs on float pixels in tf.data)
leave as float32 in [0, 1], which `model_input` passes through. With `--augment_on=device` the
trainer passes no augmentation here, the batches stay uint8, and the train step augments them
on each replica's device (trainer/step.py).
Encoded (JPEG/PNG) datasets are decoded and resized per example before batching, as sizes vary
(`prepare --image_size` does that once instead; `datasets.resize` holds the one decode and resize).

Eval: no shuffle, augmentation or repeat; every example of the split is read exactly once across
all workers, batches are padded to full size with weight-0 examples, and with `num_batches` every
worker yields exactly that many batches, so all workers and replicas run the same number of steps.

With a tf.data service (`data_service=grpc://...`, training only; `datasets.service` runs its
servers), the training pipeline above, up to the batches, runs on the service's workers over all
the split's files, which the dispatcher hands out (distributed_epoch): the trainers neither shard
nor read training files themselves, and share each epoch, every example once across all of them.

Sharding (`datasets.sharding`): each example of a split belongs to exactly one worker's share,
and one epoch of a worker's training input is its share, each example once, in a new order every
epoch. By file when the split's shard count is a multiple of the worker count (each worker reads
shards/workers files); otherwise by record (every worker reads all files in one fixed order and
keeps every `num_workers`-th record: the worker count times the reads of file sharding). One log
line per split and worker count says which was chosen and its cost. The same rule decides
`eval_batches_per_worker`.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf
from absl import logging

from datasets import augment as augment_lib
from datasets import crop as crop_lib
from datasets import resize as resize_lib
from datasets.augment import AugmentConfig
from datasets.metadata import DatasetMetadata
from datasets.sharding import Sharding, sharding

AUTOTUNE = tf.data.AUTOTUNE
# Files read at once per worker: enough to mix shards and keep both cores busy.
_CYCLE_LENGTH = 8
# Records handed over at once by a parallel file reader.
_CHUNK = 64


def normalize(images_uint8) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1]. The only normalization: the SavedModel export reuses it."""
    return tf.cast(images_uint8, tf.float32) * (1.0 / 255.0)


def model_input(images) -> tf.Tensor:
    """A batch as the model takes it: uint8 pixels normalized, float (augmented) ones unchanged."""
    return normalize(images) if images.dtype == tf.uint8 else images


def eval_batches_per_worker(
    metadata: DatasetMetadata, split: str, batch_size: int, num_workers: int
) -> int:
    """Batches every worker must yield so each fits all its examples; the same for all workers."""
    shares = sharding(metadata, split, num_workers)
    most = max(shares.num_examples(w) for w in range(num_workers))
    return max(1, math.ceil(most / batch_size))


# (data_dir, split, num_workers) already described: the trainer builds the evaluation input
# again at every evaluation, and the choice is the same each time.
_described: set[tuple[str, str, int]] = set()


def _log_once(shares: Sharding, data_dir: str) -> None:
    key = (data_dir, shares.split, shares.num_workers)
    if key in _described:
        return
    _described.add(key)
    if shares.by_file:
        logging.info("%s", shares.describe())
    else:
        logging.warning("%s", shares.describe())


def features(metadata: DatasetMetadata) -> dict:
    """The parse spec of the dataset's records: convoy's own `image`/`label`, or the keys an
    in-place dataset (`prepare --source=tfrecord --in_place`) records in metadata.json."""
    return {
        metadata.image_key: tf.io.FixedLenFeature([], tf.string),
        metadata.label_key: tf.io.FixedLenFeature([], tf.int64),
    }


def _parsed(metadata: DatasetMetadata, parsed: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """(image bytes, int32 class ids) of parsed records; the label offset of a foreign layout
    (TF-Slim's ImageNet counts from 1) is removed here, once."""
    labels = parsed[metadata.label_key]
    if metadata.label_offset:
        labels = labels - metadata.label_offset
    return parsed[metadata.image_key], tf.cast(labels, tf.int32)


def _target(metadata: DatasetMetadata, image_size, channels) -> tuple[int, int, int]:
    if image_size is None:
        if metadata.image_shape is None:
            raise ValueError(
                f"dataset '{metadata.name}' has images of varying sizes; pass image_size=(H, W)"
            )
        image_size = metadata.image_shape[:2]
    return int(image_size[0]), int(image_size[1]), int(channels or metadata.channels)


def _to_model_input(images: tf.Tensor, height: int, width: int, channels: int) -> tf.Tensor:
    """uint8 [B, h, w, c] -> uint8 [B, height, width, channels] (gray <-> RGB, bilinear resize)."""
    have = images.shape[-1]
    if have == 1 and channels == 3:
        images = tf.image.grayscale_to_rgb(images)
    elif have == 3 and channels == 1:
        images = tf.image.rgb_to_grayscale(images)
    elif have != channels:
        raise ValueError(f"cannot convert {have}-channel images to {channels} channels")
    if tuple(images.shape[1:3]) != (height, width):
        # Back to uint8 so training sees exactly what an exported model fed uint8 images sees.
        images = resize_lib.resize_uint8(images, (height, width))
    return images


def _decode_raw_batch(metadata: DatasetMetadata, target):
    h, w, c = metadata.image_shape

    def decode(serialized):
        encoded, labels = _parsed(metadata, tf.io.parse_example(serialized, features(metadata)))
        images = tf.reshape(tf.io.decode_raw(encoded, tf.uint8), [-1, h, w, c])
        images.set_shape(
            [serialized.shape[0], h, w, c]
        )  # keep a static batch size when there is one
        return _to_model_input(images, *target), labels

    return decode


def _decode_encoded_example(metadata: DatasetMetadata, target):
    height, width, channels = target

    def decode(serialized):
        encoded, label = _parsed(
            metadata, tf.io.parse_single_example(serialized, features(metadata))
        )
        image = resize_lib.decode(encoded, channels)
        image = _to_model_input(image[tf.newaxis], height, width, channels)[0]
        image.set_shape([height, width, channels])  # resize is skipped when sizes match
        return image, label

    return decode


def _decode_native(metadata: DatasetMetadata, channels: int):
    """serialized -> (uint8 [h, w, channels] at the image's own size, int32 label)."""

    def decode(serialized):
        encoded, label = _parsed(
            metadata, tf.io.parse_single_example(serialized, features(metadata))
        )
        if metadata.encoding == "raw":
            image = tf.reshape(tf.io.decode_raw(encoded, tf.uint8), metadata.image_shape)
            have = metadata.image_shape[-1]
            if have != channels:
                image = _to_model_input(image[tf.newaxis], *metadata.image_shape[:2], channels)[0]
        else:
            image = resize_lib.decode(encoded, channels)
        return image, label

    return decode


def _cropped_batches(records, metadata, target, batch_size, drop_remainder, finish, crop):
    """Like `_batches`, one example at a time: `crop.image(image, index)` takes each image at its
    own size (and the example's position in the stream, which seeds a random crop) to the
    target; for encoded records `crop.encoded(bytes, index)`, when there is one, decodes and
    crops in one (only the window of a JPEG is decoded)."""
    height, width, channels = target
    decode = _decode_native(metadata, channels)

    def one(index, serialized):
        if metadata.encoding == "encoded" and crop.encoded is not None:
            encoded, label = _parsed(
                metadata, tf.io.parse_single_example(serialized, features(metadata))
            )
            image = crop.encoded(encoded, index)
        else:
            image, label = decode(serialized)
            image = crop.image(image, index)
        image.set_shape([height, width, channels])
        return image, label

    return (
        records.enumerate()
        .map(one, num_parallel_calls=AUTOTUNE)
        .batch(batch_size, drop_remainder=drop_remainder)
        .map(finish, num_parallel_calls=AUTOTUNE)
    )


def _batches(
    records: tf.data.Dataset,
    metadata: DatasetMetadata,
    target,
    batch_size: int,
    drop_remainder: bool,
    finish,
    crop=None,
) -> tf.data.Dataset:
    """Serialized records -> finish(uint8 images [B, H, W, C], int32 labels [B]).

    `finish` (normalize, pad, ...) runs in the same map as the decode: one stage fewer per batch.
    With `crop` (see `_cropped_batches`) every image is decoded, cropped and resized on its own.
    """
    if crop is not None:
        return _cropped_batches(records, metadata, target, batch_size, drop_remainder, finish, crop)
    if metadata.encoding == "raw":
        decode = _decode_raw_batch(metadata, target)
        return records.batch(batch_size, drop_remainder=drop_remainder).map(
            lambda serialized: finish(*decode(serialized)), num_parallel_calls=AUTOTUNE
        )
    return (
        records.map(_decode_encoded_example(metadata, target), num_parallel_calls=AUTOTUNE)
        .batch(batch_size, drop_remainder=drop_remainder)
        .map(finish, num_parallel_calls=AUTOTUNE)
    )


def _read_files(files: tf.data.Dataset, cycle_length: int) -> tf.data.Dataset:
    """Records of `files`, read `cycle_length` files at a time in parallel, deterministically.

    Each parallel reader hands over chunks of records, not single records: with per-record
    hand-over the thread synchronisation costs more than the reading (~110k vs ~200k+ MNIST
    records/s on two cores). Shards are written in random order, so chunks do not hurt mixing.
    """
    chunks = files.interleave(
        lambda path: tf.data.TFRecordDataset(path).batch(_CHUNK),
        cycle_length=cycle_length,
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    return chunks.unbatch()


def _synthetic(metadata, target, batch_size, training, seed, num_batches):
    """One random batch of the right shape and dtype, repeated: measures compute without input."""
    h, w, c = target
    images = tf.cast(
        tf.random.stateless_uniform(
            [batch_size, h, w, c], seed=[seed, 0], minval=0, maxval=256, dtype=tf.int32
        ),
        tf.uint8,
    )
    labels = tf.random.stateless_uniform(
        [batch_size], seed=[seed, 1], minval=0, maxval=metadata.num_classes, dtype=tf.int32
    )
    element = (images, labels) if training else (images, labels, tf.ones([batch_size]))
    return tf.data.Dataset.from_tensors(element).repeat(
        num_batches if num_batches is not None else -1
    )


def _with_options(ds: tf.data.Dataset, threads: int) -> tf.data.Dataset:
    options = tf.data.Options()
    # We shard per worker ourselves; a strategy must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True  # a restored iterator must continue with the same elements
    if threads:
        # tf.data's shared pool has a thread per core of the host, whatever the container's CPU
        # limit and however many processes share it (trainer/threads.py sizes this).
        options.threading.private_threadpool_size = threads
    return ds.with_options(options)


def input_fn(
    metadata: DatasetMetadata,
    data_dir: str,
    split: str,
    batch_size: int,
    *,
    training: bool,
    worker_index: int = 0,
    num_workers: int = 1,
    image_size=None,
    channels=None,
    augment: AugmentConfig | None = None,
    random_resized_crop: bool = False,
    central_crop: float = 0.0,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    num_batches: int | None = None,
    synthetic: bool = False,
    threads: int = 0,
    data_service: str = "",
    service_job: str = "",
) -> tf.data.Dataset:
    """This worker's batches of `split`; `batch_size` is per replica.

    training=True: (images uint8 [B, H, W, C], float32 in [0, 1] when augmented; labels int32
    [B]), shuffled, augmented, forever (or `num_batches`). training=False: (images uint8, labels,
    weights float32 [B]), each example once,
    padding weighted 0, exactly `num_batches` batches when given. `threads`: the size of the
    pipeline's own thread pool (0: tf.data's shared one, a thread per core of the host).
    `random_resized_crop` (training) and `central_crop` (evaluation: the fraction of the shorter
    side, 0 for none) crop every image at its own size before the resize (`datasets.crop`).
    `data_service` (training only): grpc://HOST:PORT of a tf.data service dispatcher whose
    workers run the pipeline (see `_served`); the processes that pass the same `service_job`
    share its epochs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive per-replica batch size")
    target = _target(metadata, image_size, channels)
    if synthetic:
        return _with_options(
            _synthetic(metadata, target, batch_size, training, seed, num_batches), threads
        )
    if not 0 <= worker_index < num_workers:
        raise ValueError(
            f"worker_index={worker_index}, num_workers={num_workers}: "
            "expected 0 <= worker_index < num_workers"
        )
    if training and data_service:
        ds = _served(
            metadata,
            data_dir,
            split,
            target,
            batch_size,
            augment or AugmentConfig(),
            shuffle_buffer,
            data_service,
            service_job,
            random_resized_crop,
        )
        if num_batches is not None:
            ds = ds.take(num_batches)
        return _with_options(ds.prefetch(AUTOTUNE), threads)
    shares = sharding(metadata, split, num_workers)
    _log_once(shares, data_dir)
    paths = metadata.shard_paths(data_dir, split)
    share = _Share(
        files=[paths[i] for i in shares.shards(worker_index)],
        by_record=not shares.by_file,
        num_examples=shares.num_examples(worker_index),
    )
    if training:
        ds = _train(
            share,
            metadata,
            target,
            batch_size,
            worker_index,
            num_workers,
            augment or AugmentConfig(),
            seed,
            shuffle_buffer,
            random_resized_crop,
        )
        if num_batches is not None:
            ds = ds.take(num_batches)
    else:
        ds = _eval(
            share,
            metadata,
            target,
            batch_size,
            worker_index,
            num_workers,
            num_batches,
            central_crop,
        )
    return _with_options(ds.prefetch(AUTOTUNE), threads)


@dataclasses.dataclass(frozen=True)
class _Share:
    """What one worker reads of one split."""

    files: list[str]
    by_record: bool  # read all files, keep record i when i % num_workers == worker_index
    num_examples: int


@dataclasses.dataclass(frozen=True)
class _Crop:
    """How `_cropped_batches` crops: from a decoded image, and (optionally) from the bytes."""

    image: object  # fn(uint8 [h, w, c], index) -> uint8 [H, W, c]
    encoded: object = None  # fn(encoded bytes, index) -> uint8 [H, W, c]


def _random_crop(target, seed: int, worker_index: int) -> _Crop:
    """The training crop: keyed by the example's position in this worker's stream."""
    # Its own seed stream, apart from the augmentation's (keyed by the batch counter).
    base = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, worker_index], tf.int64), 0x63726F70
    )

    def key(index):
        return tf.random.experimental.stateless_fold_in(base, index)

    return _Crop(
        image=lambda image, index: crop_lib.random_resized_crop(image, target[:2], key(index)),
        encoded=lambda encoded, index: crop_lib.random_resized_crop_encoded(
            encoded, target[2], target[:2], key(index)
        ),
    )


def _central_crop(target, fraction: float) -> _Crop:
    height, width, channels = target

    def crop(image, index):
        del index
        cropped = crop_lib.central_crop(image, fraction)
        return resize_lib.resize_uint8(cropped[tf.newaxis], (height, width))[0]

    return _Crop(image=crop)


def _train(
    share,
    metadata,
    target,
    batch_size,
    worker_index,
    num_workers,
    augment,
    seed,
    shuffle_buffer,
    random_resized_crop=False,
):
    worker_seed = seed * 1_000_003 + worker_index  # workers shuffle and augment differently
    files = tf.data.Dataset.from_tensor_slices(share.files)
    if share.by_record:
        # One fixed file order on every worker is what makes "every num_workers-th record" a
        # partition. Not shuffled: tf.data's seeded shuffle also depends on the process's global
        # seed, which need not be the same on every worker.
        records = _read_files(files, _CYCLE_LENGTH).shard(num_workers, worker_index)
    else:
        files = files.shuffle(len(share.files), seed=worker_seed, reshuffle_each_iteration=True)
        records = _read_files(files, min(_CYCLE_LENGTH, len(share.files)))
    # Shuffled within one pass, then repeated: each epoch is this worker's share, every example
    # once, in a new order (shuffling after the repeat would mix the ends of two epochs, some
    # examples twice before others once). Never more than one pass in the buffer: for large
    # encoded images (and in every iterator checkpoint, which holds the buffer) it costs memory.
    buffer = max(1, min(shuffle_buffer, share.num_examples))
    records = records.shuffle(buffer, seed=worker_seed, reshuffle_each_iteration=True).repeat()
    crop = _random_crop(target, seed, worker_index) if random_resized_crop else None
    ds = _batches(
        records,
        metadata,
        target,
        batch_size,
        True,
        lambda images, labels: (images, labels),
        crop,
    )
    if not augment.enabled:
        return ds
    # The batch counter keys the stateless random ops, so a restored iterator augments identically.
    base = tf.constant([seed, worker_index], tf.int64)
    return ds.enumerate().map(
        lambda step, batch: (
            augment_lib.apply(
                normalize(batch[0]), augment, tf.random.experimental.stateless_fold_in(base, step)
            ),
            batch[1],
        ),
        num_parallel_calls=AUTOTUNE,
    )


def _eval(
    share, metadata, target, batch_size, worker_index, num_workers, num_batches, central_crop=0.0
):
    records = tf.data.TFRecordDataset(share.files)
    if share.by_record:
        records = records.shard(num_workers, worker_index)
    real = math.ceil(share.num_examples / batch_size)
    total = real if num_batches is None else num_batches
    if total < real:
        raise ValueError(
            f"num_batches={num_batches} < {real} batches needed for this worker's "
            f"{share.num_examples} examples of '{metadata.name}'; see eval_batches_per_worker"
        )
    h, w, c = target

    def pad(images, labels):
        # The last real batch may be short; fill it with weight-0 examples to a static shape.
        n = tf.shape(labels)[0]
        missing = batch_size - n
        images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
        weights = tf.pad(tf.ones([n], tf.float32), [[0, missing]])
        labels = tf.pad(labels, [[0, missing]])
        return (
            tf.ensure_shape(images, [batch_size, h, w, c]),
            tf.ensure_shape(labels, [batch_size]),
            tf.ensure_shape(weights, [batch_size]),
        )

    crop = _central_crop(target, central_crop) if central_crop else None
    ds = _batches(records, metadata, target, batch_size, False, pad, crop)
    # Padding without end, then exactly `total` batches: a shard cut short at a record boundary
    # (fewer records than metadata.json promises) still gives every worker the same number of
    # batches, so the evaluation ends and its example count can tell (trainer/evaluation.py).
    padding = tf.data.Dataset.from_tensors(
        (
            tf.zeros([batch_size, h, w, c], tf.uint8),
            tf.zeros([batch_size], tf.int32),
            tf.zeros([batch_size]),
        )
    ).repeat()
    return ds.concatenate(padding).take(total)


def service_epoch(
    metadata: DatasetMetadata,
    data_dir: str,
    split: str,
    target,
    batch_size: int,
    augment: AugmentConfig,
    shuffle_buffer: int,
    random_resized_crop: bool = False,
) -> tf.data.Dataset:
    """One pass over every shard of `split` as the tf.data service's workers run it.

    Batches of up to `batch_size` (the last one of each worker's share may be short, so that no
    example is dropped), shuffled, decoded and augmented on the worker. Its source is the list of
    files, which the dispatcher hands out one by one (distributed_epoch), so each worker reads the
    files it is given: the trainers do no sharding of their own.

    Built without a global seed: the service deserializes it afresh for every epoch, and seeded
    shuffles would then give every epoch the same order; unseeded, each epoch draws new seeds (the
    order under the service is not reproducible in any case: it depends on which worker serves
    first).
    """
    with _no_global_seed():
        files = tf.data.Dataset.from_tensor_slices(metadata.shard_paths(data_dir, split))
        files = files.shuffle(len(metadata.splits[split].shards))
        records = _read_files(files, _CYCLE_LENGTH)
        buffer = max(1, min(shuffle_buffer, metadata.splits[split].num_examples))
        records = records.shuffle(buffer)

        def finish(images, labels):
            if not augment.enabled:
                return images, labels
            seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
            return augment_lib.apply(normalize(images), augment, seed), labels

        crop = None
        if random_resized_crop:

            def key(index):
                del index  # a fresh draw per example: no seed would survive the service
                return tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)

            crop = _Crop(
                image=lambda image, index: crop_lib.random_resized_crop(
                    image, target[:2], key(index)
                ),
                encoded=lambda encoded, index: crop_lib.random_resized_crop_encoded(
                    encoded, target[2], target[:2], key(index)
                ),
            )
        return _batches(records, metadata, target, batch_size, False, finish, crop)


class _no_global_seed:
    """Builds a dataset with TensorFlow's global seed unset, then restores it."""

    def __enter__(self):
        from tensorflow.python.eager import context

        self._graph_seed = context.global_seed()
        tf.random.set_seed(None)

    def __exit__(self, *exc_info):
        tf.random.set_seed(self._graph_seed)


def _served(
    metadata,
    data_dir,
    split,
    target,
    batch_size,
    augment,
    shuffle_buffer,
    data_service,
    service_job,
    random_resized_crop=False,
):
    """Endless per-replica batches of `split` served by the tf.data service at `data_service`.

    Every trainer process that uses the same `service_job` joins one `distributed_epoch` job:
    each repetition (the `repeat` here, on the trainer) is one new iteration of the job, one pass
    over the split whose examples go to whichever trainer asks first, each exactly once. The
    batches are cut again to exactly `batch_size` on the trainer, across the short ones.
    """
    key = (data_dir, split, data_service)
    if key not in _described:
        _described.add(key)
        logging.info(
            "split '%s' of %s: served by the tf.data service at %s (job %s, distributed_epoch: "
            "its workers divide the %d files among themselves, every example once per epoch "
            "across all training processes)",
            split,
            metadata.name,
            data_service,
            service_job,
            len(metadata.splits[split].shards),
        )
    served = served_epoch(
        service_epoch(
            metadata,
            data_dir,
            split,
            target,
            batch_size,
            augment,
            shuffle_buffer,
            random_resized_crop,
        ),
        data_service,
        service_job,
    )
    return served.repeat().rebatch(batch_size, drop_remainder=True)


def served_epoch(epoch: tf.data.Dataset, data_service: str, service_job: str) -> tf.data.Dataset:
    """`epoch` (a `service_epoch`) run by the tf.data service at `data_service`, in the
    distributed_epoch job `service_job`: each iteration of the result, in every process that
    names the same job, is one new pass over the split shared by all of them."""
    return epoch.apply(
        tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch", service=data_service, job_name=service_job
        )
    )
