"""The run configuration: every setting declared once, as a field of the frozen `Config`.

A field carries its default, its help text and its flag group; `trainer.flags` derives the absl
flags from the fields and converts the parsed values back with the small table of converters here,
keyed by the field's type (`list_converter`). The same `Config` can be built in Python
(`Config(model="lenet", epochs=3)`) with the flags' defaults, and `validated` applies the same
checks to both. Checks that need no TensorFlow happen here (the paths too: the workdir can be
written, the data directory and init checkpoint exist), so a bad command line fails in
milliseconds with one line naming the flag. This module imports no other trainer module but
`choices`: `flags` and `workdir` import it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import sys
import time
import typing

from trainer import choices


class ConfigError(ValueError):
    """An invalid command line or run setup; the message is one line naming the flag."""


def _setting(default, help_text: str, *, choices_: tuple[str, ...] | None = None):
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices_})


# The help groups, in order, with the first field of each (fields keep declaration order).
GROUPS = {
    "data_dir": "Data",
    "workdir": "Output",
    "model": "Model and precision",
    "strategy": "Distribution",
    "global_batch_size": "Optimisation",
    "steps_per_loop": "Loop, checkpoints, logging",
}


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    data_dir: str = _setting(
        "",
        "Prepared dataset directory (with metadata.json, written by `python -m datasets.prepare`)."
        " Empty: the embedded MNIST sample.",
    )
    train_split: str = _setting("train", "Split to train on.")
    eval_split: str = _setting(
        "", "Split to evaluate on. Empty: `test` if the dataset has it, else `validation`."
    )
    image_size: tuple[int, int] | None = _setting(
        None, "Model input HEIGHT,WIDTH. Empty: the model's own size, else the dataset's."
    )
    shuffle_buffer: int = _setting(10_000, "Examples in the training shuffle buffer.")
    random_flip: bool = _setting(False, "Augment: random horizontal flips.")
    random_shift: float = _setting(0.0, "Augment: random shift, as a fraction of the image size.")
    random_rotation: float = _setting(0.0, "Augment: random rotation, maximum degrees.")
    random_zoom: float = _setting(0.0, "Augment: random zoom, maximum fraction.")
    augment_on: str = _setting(
        "auto",
        "Where --random_flip/shift/rotation/zoom run (--random_resized_crop, which changes the "
        "image size, stays in the pipeline). host: in the tf.data pipeline, on float pixels; "
        "device: inside the train step on each replica's device (the pipeline ships uint8), "
        "keyed by (--seed, step, replica), outside XLA. auto: device when training on GPUs, "
        "else host.",
        choices_=choices.AUGMENT_ON,
    )
    random_resized_crop: bool = _setting(
        False,
        "Augment: the Inception random-resized crop (8%-100% of the area, aspect 3/4-4/3) of "
        "each image at its own size, resized to the model's input (the ResNet recipe).",
    )
    eval_central_crop: float = _setting(
        0.0,
        "Evaluate (and export) on the centred square of this fraction of each image's shorter "
        "side, resized to the model's input (0.875: the ResNet recipe; 0: the whole image).",
    )
    synthetic_data: bool = _setting(
        False, "Feed random tensors of the dataset's shape (measures compute alone)."
    )
    data_service: str = _setting(
        "",
        "grpc://HOST:PORT of a tf.data service dispatcher (`python -m datasets.service`): the "
        "training input runs on its workers, every example once per epoch across all training "
        "processes (distributed_epoch); evaluation stays local. Empty: the local pipeline.",
    )
    # Output.
    workdir: str = _setting(
        "",
        "Directory for checkpoints, TensorBoard events, exports and summary.json. Empty: "
        "runs/<model>-<time>.",
    )
    init_checkpoint: str = _setting(
        "",
        "Checkpoint (file prefix or directory) whose model weights a run starts from when the "
        "workdir has none; every variable of the model must be in it with the same shape.",
    )
    init_checkpoint_partial: bool = _setting(
        False,
        "With --init_checkpoint: load only the variables whose place and shape match (e.g. the "
        "backbone, under a new head for another class count); the rest stay as initialised.",
    )
    # Model and precision.
    model: str = _setting(
        "tutorial_cnn",
        f"Model: a built-in ({', '.join(choices.BUILTIN_MODELS)}), or your own builder "
        "fn(input_shape, num_classes) -> keras.Model as package.module:fn or path/to/file.py:fn "
        "(a name the module registers with @trainer.register works in place of fn).",
    )
    precision: str = _setting(
        "auto",
        "auto: what this machine runs fast (GPUs: bf16 from compute capability 8.0, fp16 on 7.x, "
        "else fp32; CPUs: bf16 only with AVX512_BF16 or AMX-BF16, else fp32); fp32; fp16 (mixed, "
        "dynamic loss scaling); bf16 (mixed).",
        choices_=choices.PRECISIONS,
    )
    xla: str = _setting(
        "auto",
        "XLA-compile the per-replica step. auto: on for GPUs, off for CPUs (XLA is slower on CPU).",
        choices_=choices.XLA_MODES,
    )
    # Distribution.
    strategy: str = _setting(
        "auto",
        "Distribution backend. auto: horovod under horovodrun/mpirun, multi_worker when "
        "TF_CONFIG names several tasks, mirrored with several GPUs, else one_device.",
        choices_=choices.STRATEGIES,
    )
    gpus: tuple[int, ...] = _setting((), "GPU indices to use (default: all visible).")
    num_cpu_devices: int = _setting(
        1,
        "Split the CPU into this many logical devices (tests the mirrored logic on CPU-only "
        "machines).",
    )
    fp16_allreduce: bool = _setting(
        False,
        "Sum gradients over replicas in fp16 (half the bytes), each tensor scaled by a power of "
        "two first so that small gradients survive; every backend (no-op with one replica).",
    )
    sync_batchnorm: bool = _setting(
        False,
        "BatchNormalization normalizes with the statistics of the global batch (one all-reduce "
        "per layer per step) instead of each replica's own share; tf.distribute backends "
        "(mirrored, multi_worker) only; turns XLA off.",
    )
    stall_timeout_s: float = _setting(
        0.0,
        "Exit 138 (retryable), dumping stacks, when no training progress is made for this long "
        "(0: off; with --data_service 300 s, as a data worker lost mid-epoch stalls the input).",
    )
    peer_join_timeout_s: float = _setting(
        120.0,
        "Several processes: exit 138 (retryable) naming the missing ones when the other "
        "processes have not all started within this long.",
    )
    peer_loss_timeout_s: float = _setting(
        60.0,
        "Several processes: exit 138 (retryable) when a peer has been unreachable this long "
        "(MultiWorkerMirrored: the coordination service's heartbeat timeout).",
    )
    # Optimisation.
    global_batch_size: int = _setting(64, "Examples per step summed over all replicas.")
    train_steps: int = _setting(0, "Training steps (0: use --epochs).")
    epochs: float = _setting(15.0, "Epochs over the training split, when --train_steps is 0.")
    optimizer: str = _setting("adam", "Optimizer.", choices_=choices.OPTIMIZERS)
    learning_rate: float = _setting(1e-3, "Peak learning rate (before --scale_lr).")
    momentum: float = _setting(0.9, "Momentum for `momentum` and `rmsprop`.")
    lr_schedule: str = _setting(
        "cosine", "Learning-rate schedule after warmup.", choices_=choices.SCHEDULES
    )
    warmup_steps: int = _setting(0, "Linear warmup steps.")
    warmup_epochs: float = _setting(
        0.0,
        "Linear warmup in epochs of the training split (the steps follow the batch size); "
        "instead of --warmup_steps.",
    )
    lr_step_boundaries: tuple[float, ...] = _setting(
        (),
        "step schedule: fractions of training (e.g. 0.5,0.75) where the rate is multiplied by "
        "--lr_step_factor.",
    )
    lr_step_factor: float = _setting(0.1, "step schedule: multiplier at each boundary.")
    scale_lr: bool = _setting(
        False, "Linear scaling rule: learning_rate * global_batch / --base_batch_size."
    )
    base_batch_size: int = _setting(128, "Batch size the learning rate was tuned for.")
    weight_decay: float = _setting(0.0, "Weight decay (see --weight_decay_mode).")
    weight_decay_mode: str = _setting(
        "decoupled",
        "decoupled: Keras's (w -= lr * weight_decay * w); l2: weight_decay * w added to the "
        "gradient before the optimizer, through momentum (Caffe's, PyTorch SGD's, the ResNet "
        "recipes').",
        choices_=choices.WEIGHT_DECAY_MODES,
    )
    decay_norm_and_bias: bool = _setting(
        True,
        "Apply the weight decay to 1-D variables too (BatchNorm scales and offsets, biases); "
        "--nodecay_norm_and_bias: to kernels only (the ResNet recipe).",
    )
    label_smoothing: float = _setting(0.0, "Label smoothing.")
    clip_grad_norm: float = _setting(0.0, "Clip gradients to this global norm (0: off).")
    grad_accum_steps: int = _setting(
        1,
        "Split each replica's batch into this many micro-batches and sum their gradients before "
        "the one all-reduce and update (memory of one micro-batch; same update).",
    )
    ema_decay: float = _setting(
        0.0,
        "Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); "
        "evaluation and export use the averaged weights.",
    )
    # Loop, checkpoints, logging.
    steps_per_loop: int = _setting(50, "Steps run inside one compiled function call.")
    eval_every_steps: int = _setting(0, "Evaluate every N steps (0: only at the end).")
    checkpoint_every_steps: int = _setting(
        500, "Save a checkpoint every N steps (0: only at the end and on SIGTERM)."
    )
    keep_checkpoints: int = _setting(3, "Checkpoints kept.")
    log_every_steps: int = _setting(
        100, "Console and TensorBoard scalars every N steps (0: only at the end)."
    )
    histogram_every_steps: int = _setting(0, "Weight histograms every N steps (0: off).")
    profile_steps: tuple[int, int] | None = _setting(
        None, "A,B: write a profiler trace for steps A..B."
    )
    time_breakdown: bool = _setting(
        True,
        "Measure the step's time breakdown (input pipeline, forward+backward, all-reduce, "
        "optimizer, whole step) after the first chunk, into TensorBoard time/*_ms and "
        "summary.json's time_breakdown and bound; leaves the training result unchanged.",
    )
    time_breakdown_every_steps: int = _setting(
        0, "With --time_breakdown: measure it again every N steps (0: only after the first chunk)."
    )
    keep_best: str = _setting(
        "",
        "Keep the checkpoint with the best value of this eval metric in "
        "WORKDIR/checkpoints/best (empty: off).",
        choices_=choices.KEEP_BEST_METRICS,
    )
    early_stopping_patience: int = _setting(
        0,
        "Stop after this many evaluations without --keep_best improving by "
        "--early_stopping_min_delta (0: off).",
    )
    early_stopping_min_delta: float = _setting(
        0.0, "Smallest change of the --keep_best metric that counts as an improvement."
    )
    export: bool = _setting(True, "Export a SavedModel and a .keras file at the end.")
    export_from: str = _setting(
        "auto",
        "Which weights to export: best (the --keep_best checkpoint), last, or auto (best when "
        "kept, else last).",
        choices_=choices.EXPORT_FROM,
    )
    report: bool = _setting(
        False,
        "At the end, write WORKDIR/report/ (curves, confusion matrix, mistakes, filters, "
        "activations, report.json, index.html), as `python -m trainer.report WORKDIR` does.",
    )
    seed: int = _setting(0, "Random seed (data order, initialisation, dropout).")
    deterministic: bool = _setting(False, "Seed everything and enable TF op determinism.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def fields() -> list[tuple[dataclasses.Field, type]]:
    """Config's fields with their resolved types, in declaration order."""
    hints = typing.get_type_hints(Config)
    return [(f, hints[f.name]) for f in dataclasses.fields(Config)]


def list_converter(field_type) -> typing.Callable[[str, list[str]], typing.Any] | None:
    """How a comma-separated flag becomes a field of `field_type` (None: not a list setting)."""
    return _LIST_CONVERTERS.get(field_type)


def validated(config: Config, *, check_paths: bool = True) -> Config:
    """`config` checked (ConfigError otherwise), with its defaults that depend on others resolved.

    Idempotent, so a Config built in Python and one parsed from flags go through the same checks.
    """
    if not config.workdir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = config.model.rsplit(":", 1)[-1]
        config = dataclasses.replace(config, workdir=os.path.join("runs", f"{name}-{stamp}"))
    _check_values(config)
    if check_paths:
        _check_paths(config)
    return config


def _check_values(c: Config) -> None:
    for field, _ in fields():
        allowed = field.metadata.get("choices")
        value = getattr(c, field.name)
        if allowed and value not in allowed:
            raise ConfigError(
                f"--{field.name}={value}: unknown; expected one of {', '.join(allowed)}"
            )
    if not _model_is_known(c.model):
        raise ConfigError(
            f"--model={c.model}: unknown; expected one of {', '.join(choices.BUILTIN_MODELS)}, "
            "or your own builder as package.module:callable or path/to/file.py:callable"
        )
    positive = (
        "global_batch_size",
        "grad_accum_steps",
        "steps_per_loop",
        "keep_checkpoints",
        "num_cpu_devices",
        "base_batch_size",
        "shuffle_buffer",
    )
    for name in positive:
        if getattr(c, name) <= 0:
            raise ConfigError(f"--{name}={getattr(c, name)}: expected a positive integer")
    non_negative = (
        "train_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "log_every_steps",
        "histogram_every_steps",
        "time_breakdown_every_steps",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "warmup_steps",
        "warmup_epochs",
        "weight_decay",
        "clip_grad_norm",
        "stall_timeout_s",
        "random_shift",
        "random_rotation",
        "random_zoom",
    )
    for name in non_negative:
        if getattr(c, name) < 0:
            raise ConfigError(f"--{name}={getattr(c, name)}: expected a value >= 0")
    for name in ("peer_join_timeout_s", "peer_loss_timeout_s"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"--{name}={getattr(c, name)}: expected a value > 0 (seconds)")
    if c.train_steps == 0 and c.epochs <= 0:
        raise ConfigError(f"--epochs={c.epochs}: expected > 0 when --train_steps is 0")
    if c.learning_rate <= 0:
        raise ConfigError(f"--learning_rate={c.learning_rate}: expected > 0")
    if c.warmup_steps and c.warmup_epochs:
        raise ConfigError(
            f"--warmup_steps={c.warmup_steps} with --warmup_epochs={c.warmup_epochs}: "
            "expected one of the two"
        )
    if not 0.0 <= c.eval_central_crop <= 1.0:
        raise ConfigError(
            f"--eval_central_crop={c.eval_central_crop}: expected a fraction in (0, 1] of the "
            "shorter side, or 0 for none"
        )
    if not 0.0 <= c.label_smoothing < 1.0:
        raise ConfigError(f"--label_smoothing={c.label_smoothing}: expected a value in [0, 1)")
    if any(not 0.0 < b < 1.0 for b in c.lr_step_boundaries):
        raise ConfigError(
            f"--lr_step_boundaries={','.join(map(str, c.lr_step_boundaries))}: "
            "expected fractions of training strictly between 0 and 1"
        )
    if c.lr_schedule == "step" and not c.lr_step_boundaries:
        raise ConfigError("--lr_schedule=step needs --lr_step_boundaries (e.g. 0.5,0.75)")
    if c.profile_steps and not 0 <= c.profile_steps[0] < c.profile_steps[1]:
        raise ConfigError(
            f"--profile_steps={c.profile_steps[0]},{c.profile_steps[1]}: expected "
            "A,B with 0 <= A < B"
        )
    if c.data_service:
        _check_data_service(c)
    if c.image_size and min(c.image_size) <= 0:
        raise ConfigError(f"--image_size={c.image_size}: expected positive HEIGHT,WIDTH")
    if c.sync_batchnorm and c.xla == "on":
        raise ConfigError(
            "--sync_batchnorm with --xla=on: the statistics' all-reduce runs inside the model, "
            "where XLA has no collective kernel; use --xla=off (or auto)"
        )
    if c.sync_batchnorm and c.grad_accum_steps > 1:
        raise ConfigError(
            f"--sync_batchnorm with --grad_accum_steps={c.grad_accum_steps}: tf.distribute cannot "
            "all-reduce the statistics inside the micro-batch loop; use one of the two"
        )
    if c.deterministic and c.xla == "on":
        raise ConfigError(
            "--deterministic with --xla=on: XLA has no deterministic pooling gradient;"
            " use --xla=off (or auto)"
        )
    if c.global_batch_size % c.grad_accum_steps:
        raise ConfigError(
            f"--global_batch_size={c.global_batch_size}: not divisible by "
            f"--grad_accum_steps={c.grad_accum_steps}"
        )
    if not 0.0 <= c.ema_decay < 1.0:
        raise ConfigError(f"--ema_decay={c.ema_decay}: expected a value in [0, 1) (0: off)")
    if c.early_stopping_patience and not c.keep_best:
        raise ConfigError(
            f"--early_stopping_patience={c.early_stopping_patience} needs the metric it watches: "
            f"--keep_best={' or --keep_best='.join(m for m in choices.KEEP_BEST_METRICS if m)}"
        )
    if c.early_stopping_patience and not c.eval_every_steps:
        raise ConfigError(
            f"--early_stopping_patience={c.early_stopping_patience} needs periodic evaluations: "
            "set --eval_every_steps"
        )
    if c.export_from == "best" and not c.keep_best:
        raise ConfigError("--export_from=best needs --keep_best=METRIC (the best of what)")
    if c.report and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "--report draws with matplotlib, which is not installed (pip install matplotlib; "
            "installing convoy with pip brings it)"
        )


def _check_data_service(c: Config) -> None:
    prefix, _, rest = c.data_service.partition("://")
    host, sep, port = rest.rpartition(":")
    if (
        prefix != "grpc"
        or not sep
        or not host
        or "/" in host
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ConfigError(
            f"--data_service={c.data_service}: expected grpc://HOST:PORT of the tf.data service "
            "dispatcher (port 1..65535)"
        )
    if c.deterministic:
        raise ConfigError(
            "--deterministic with --data_service: the service's workers hand out batches in the "
            "order they finish them, which no seed fixes; use one of the two"
        )
    if c.synthetic_data:
        raise ConfigError(
            "--synthetic_data with --data_service: synthetic batches need no input service; use "
            "one of the two"
        )


def _model_is_known(name: str) -> bool:
    if ":" in name or name in choices.BUILTIN_MODELS:
        return True  # A module:callable is imported (and checked) when the model is built.
    # A name a Python user registered; only asked when trainer.models (TensorFlow) is loaded.
    models = sys.modules.get("trainer.models")
    return models is not None and name in models.registered()


def _check_workdir(workdir: str) -> None:
    """Raises ConfigError unless `workdir` is, or can become, a writable directory."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir}: is a file; expected a directory (or a new path)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"--workdir={workdir}: {existing} is a file, so no directory can be made under it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir}: {existing} is not writable")
    # os.access does not see a read-only mount for root; a real write does.
    try:
        probe = os.path.join(existing, f".convoy-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir}: {existing} is not writable ({e.strerror})"
        ) from None


def _check_paths(c: Config) -> None:
    _check_workdir(c.workdir)
    where = c.model.rsplit(":", 1)[0] if ":" in c.model else ""
    if where.endswith(".py") and not os.path.isfile(where):
        raise ConfigError(f"--model={c.model}: {where}: no such file")
    if c.data_dir:
        if not os.path.isdir(c.data_dir):
            raise ConfigError(
                f"--data_dir={c.data_dir}: no such directory (prepare one with "
                "`python -m datasets.prepare`)"
            )
        if not os.path.isfile(os.path.join(c.data_dir, "metadata.json")):
            raise ConfigError(
                f"--data_dir={c.data_dir}: no metadata.json there (is it a dataset "
                "written by `python -m datasets.prepare`?)"
            )
    if c.init_checkpoint:
        if os.path.isdir(c.init_checkpoint):
            # tf.train.latest_checkpoint reads the `checkpoint` state file; any *.index is a save.
            if not os.path.isfile(os.path.join(c.init_checkpoint, "checkpoint")) or not glob.glob(
                os.path.join(glob.escape(c.init_checkpoint), "*.index")
            ):
                raise ConfigError(
                    f"--init_checkpoint={c.init_checkpoint}: the directory holds no checkpoint "
                    "(expected the `checkpoint` file and PREFIX.index written by a convoy run, "
                    "e.g. RUN/checkpoints)"
                )
        elif not os.path.exists(c.init_checkpoint + ".index"):
            raise ConfigError(
                f"--init_checkpoint={c.init_checkpoint}: no checkpoint directory or "
                "prefix (expected DIR or PREFIX with PREFIX.index)"
            )


def _ints(name: str, items: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in items)
    except ValueError:
        raise ConfigError(
            f"--{name}={','.join(items)}: expected comma-separated integers"
        ) from None


def _floats(name: str, items: list[str]) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise ConfigError(f"--{name}={','.join(items)}: expected comma-separated numbers") from None


def _int_pair(name: str, items: list[str]) -> tuple[int, int] | None:
    if not items:
        return None
    values = _ints(name, items)
    if len(values) != 2:
        raise ConfigError(f"--{name}={','.join(items)}: expected two integers A,B")
    return values[0], values[1]


# The only settings whose flag value (a list of strings) differs from the field's type.
_LIST_CONVERTERS = {
    tuple[int, int] | None: _int_pair,
    tuple[int, ...]: _ints,
    tuple[float, ...]: _floats,
}
