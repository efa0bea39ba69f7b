"""The run configuration: flags parsed once into a frozen `Config`, checked before TensorFlow starts.

`config_from_argv` is the only reader of the flags defined in `trainer.flags`; everything downstream receives a Config
(or values unpacked from it). Checks that need no TensorFlow happen here, so a bad command line
fails in milliseconds with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import flags


class ConfigError(ValueError):
    """An invalid command line or run setup; the message is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    data_dir: str
    train_split: str
    eval_split: str
    image_size: tuple[int, int] | None
    shuffle_buffer: int
    random_flip: bool
    random_shift: float
    random_rotation: float
    random_zoom: float
    synthetic_data: bool
    # Output.
    workdir: str
    init_checkpoint: str
    # Model.
    model: str
    precision: str
    xla: str
    # Distribution.
    strategy: str
    gpus: tuple[int, ...]
    num_cpu_devices: int
    fp16_allreduce: bool
    stall_timeout_s: float
    # Optimisation.
    global_batch_size: int
    train_steps: int
    epochs: float
    optimizer: str
    learning_rate: float
    momentum: float
    lr_schedule: str
    warmup_steps: int
    lr_step_boundaries: tuple[float, ...]
    lr_step_factor: float
    scale_lr: bool
    base_batch_size: int
    weight_decay: float
    label_smoothing: float
    clip_grad_norm: float
    # Loop.
    steps_per_loop: int
    eval_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    log_every_steps: int
    histogram_every_steps: int
    profile_steps: tuple[int, int] | None
    export: bool
    seed: int
    deterministic: bool

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def config_from_argv(argv: list[str], *, check_paths: bool = True) -> Config:
    """Parses a full command line (argv[0] is the program) into a Config; raises ConfigError."""
    # Imported here, not at the top: defining the trainer's flags is a side effect that only the
    # command line wants (a library user or a benchmark may define flags of the same names).
    from trainer import flags as trainer_flags  # pylint: disable=import-outside-toplevel

    del trainer_flags
    FLAGS = flags.FLAGS
    FLAGS.unparse_flags()  # A second parse in one process must not inherit the first one's values.
    try:
        leftover = FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(_one_line(str(e))) from None
    if len(leftover) > 1:
        raise ConfigError(
            f"unexpected positional arguments {leftover[1:]}; every option is a --flag"
        )
    return config_from_flags(FLAGS, check_paths=check_paths)


def config_from_flags(values: flags.FlagValues, *, check_paths: bool = True) -> Config:
    """Builds and checks a Config from parsed flag values; raises ConfigError."""
    v = values
    config = Config(
        data_dir=v.data_dir,
        train_split=v.train_split,
        eval_split=v.eval_split,
        image_size=_int_pair("image_size", v.image_size),
        shuffle_buffer=v.shuffle_buffer,
        random_flip=v.random_flip,
        random_shift=v.random_shift,
        random_rotation=v.random_rotation,
        random_zoom=v.random_zoom,
        synthetic_data=v.synthetic_data,
        workdir=v.workdir or os.path.join("runs", f"{v.model}-{time.strftime('%Y%m%d-%H%M%S')}"),
        init_checkpoint=v.init_checkpoint,
        model=v.model,
        precision=v.precision,
        xla=v.xla,
        strategy=v.strategy,
        gpus=tuple(_ints("gpus", v.gpus)),
        num_cpu_devices=v.num_cpu_devices,
        fp16_allreduce=v.fp16_allreduce,
        stall_timeout_s=v.stall_timeout_s,
        global_batch_size=v.global_batch_size,
        train_steps=v.train_steps,
        epochs=v.epochs,
        optimizer=v.optimizer,
        learning_rate=v.learning_rate,
        momentum=v.momentum,
        lr_schedule=v.lr_schedule,
        warmup_steps=v.warmup_steps,
        lr_step_boundaries=tuple(_floats("lr_step_boundaries", v.lr_step_boundaries)),
        lr_step_factor=v.lr_step_factor,
        scale_lr=v.scale_lr,
        base_batch_size=v.base_batch_size,
        weight_decay=v.weight_decay,
        label_smoothing=v.label_smoothing,
        clip_grad_norm=v.clip_grad_norm,
        steps_per_loop=v.steps_per_loop,
        eval_every_steps=v.eval_every_steps,
        checkpoint_every_steps=v.checkpoint_every_steps,
        keep_checkpoints=v.keep_checkpoints,
        log_every_steps=v.log_every_steps,
        histogram_every_steps=v.histogram_every_steps,
        profile_steps=_int_pair("profile_steps", v.profile_steps),
        export=v.export,
        seed=v.seed,
        deterministic=v.deterministic,
    )
    _check(config, check_paths=check_paths)
    return config


def _check(c: Config, *, check_paths: bool) -> None:
    positive = {
        "global_batch_size": c.global_batch_size,
        "steps_per_loop": c.steps_per_loop,
        "keep_checkpoints": c.keep_checkpoints,
        "log_every_steps": c.log_every_steps,
        "num_cpu_devices": c.num_cpu_devices,
        "base_batch_size": c.base_batch_size,
        "shuffle_buffer": c.shuffle_buffer,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name}={value}: expected a positive integer")
    non_negative = {
        "train_steps": c.train_steps,
        "eval_every_steps": c.eval_every_steps,
        "checkpoint_every_steps": c.checkpoint_every_steps,
        "histogram_every_steps": c.histogram_every_steps,
        "warmup_steps": c.warmup_steps,
        "weight_decay": c.weight_decay,
        "clip_grad_norm": c.clip_grad_norm,
        "stall_timeout_s": c.stall_timeout_s,
        "random_shift": c.random_shift,
        "random_rotation": c.random_rotation,
        "random_zoom": c.random_zoom,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{name}={value}: expected a value >= 0")
    if c.train_steps == 0 and c.epochs <= 0:
        raise ConfigError(f"--epochs={c.epochs}: expected > 0 when --train_steps is 0")
    if c.learning_rate <= 0:
        raise ConfigError(f"--learning_rate={c.learning_rate}: expected > 0")
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
    if c.image_size and min(c.image_size) <= 0:
        raise ConfigError(f"--image_size={c.image_size}: expected positive HEIGHT,WIDTH")
    if c.deterministic and c.xla == "on":
        raise ConfigError(
            "--deterministic with --xla=on: XLA has no deterministic pooling gradient;"
            " use --xla=off (or auto)"
        )
    if c.fp16_allreduce and c.strategy not in ("horovod", "auto"):
        raise ConfigError(f"--fp16_allreduce works with --strategy=horovod, not {c.strategy}")
    if check_paths and c.data_dir:
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
    if (
        check_paths
        and c.init_checkpoint
        and not (os.path.isdir(c.init_checkpoint) or os.path.exists(c.init_checkpoint + ".index"))
    ):
        raise ConfigError(
            f"--init_checkpoint={c.init_checkpoint}: no checkpoint directory or "
            "prefix (expected DIR or PREFIX with PREFIX.index)"
        )


def _ints(name: str, items: list[str]) -> list[int]:
    try:
        return [int(x) for x in items]
    except ValueError:
        raise ConfigError(
            f"--{name}={','.join(items)}: expected comma-separated integers"
        ) from None


def _floats(name: str, items: list[str]) -> list[float]:
    try:
        return [float(x) for x in items]
    except ValueError:
        raise ConfigError(f"--{name}={','.join(items)}: expected comma-separated numbers") from None


def _int_pair(name: str, items: list[str]) -> tuple[int, int] | None:
    if not items:
        return None
    values = _ints(name, items)
    if len(values) != 2:
        raise ConfigError(f"--{name}={','.join(items)}: expected two integers A,B")
    return values[0], values[1]


def _one_line(message: str) -> str:
    return " ".join(message.split())
