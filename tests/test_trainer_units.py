"""The trainer's pure pieces, in-process: config and flags, plan, schedules, periodic actions, meter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from datasets.metadata import DatasetMetadata
from trainer import choices, hardware, periodic
from trainer.config import Config, ConfigError, validated
from trainer.flags import config_from_argv
from trainer.meter import Meter
from trainer.plan import Topology, resolve_plan


def _metadata(train=1000, test=101, shape=(28, 28, 1), num_classes=10, train_shards=4):
    def split(n, shards):
        sizes = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
        return {
            "num_examples": n,
            "shards": [
                {"file": f"s-{i:05d}-of-{shards:05d}.tfrecord", "num_examples": k}
                for i, k in enumerate(sizes)
            ],
        }

    splits = {"train": split(train, train_shards)}
    if test:
        splits["test"] = split(test, 2)
    return DatasetMetadata.from_dict(
        {
            "format_version": 1,
            "name": "m",
            "source": "idx",
            "encoding": "raw",
            "image_shape": list(shape),
            "channels": shape[2],
            "num_classes": num_classes,
            "class_names": [str(i) for i in range(num_classes)],
            "original_labels": list(range(num_classes)),
            "seed": 0,
            "source_files": [],
            "splits": splits,
        }
    )


ONE_CPU = Topology("one_device", num_workers=1, num_replicas=1, uses_gpu=False)
# An AVX2-only CPU without a GPU: --precision=auto resolves to fp32 on it.
AVX2_MACHINE = hardware.Machine("test CPU", 2, ("avx2",), "", (), "2.x", "3.x")


# --- config and flags -------------------------------------------------------------------------


def test_every_setting_is_a_flag_with_the_same_default():
    parsed = config_from_argv(["trainer"], check_paths=False)
    built = validated(Config(), check_paths=False)
    differ = {
        f.name
        for f in dataclasses.fields(Config)
        if getattr(parsed, f.name) != getattr(built, f.name)
    }
    assert differ <= {"workdir"}, differ  # Both default to runs/<model>-<time>.
    assert parsed.workdir.startswith("runs/tutorial_cnn-")


def test_list_flags_convert_to_the_field_types():
    c = config_from_argv(
        [
            "trainer",
            "--image_size=32,30",
            "--gpus=0,2",
            "--lr_step_boundaries=0.5,0.75",
            "--lr_schedule=step",
            "--profile_steps=3,9",
        ],
        check_paths=False,
    )
    assert c.image_size == (32, 30) and c.gpus == (0, 2) and c.profile_steps == (3, 9)
    assert c.lr_step_boundaries == (0.5, 0.75)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--image_size=32"], ["--image_size", "two integers"]),
        (["--gpus=a"], ["--gpus", "integers"]),
        (["--model=vgg19"], ["--model=vgg19", "tutorial_cnn"]),
        (["--log_every_steps=-1"], ["--log_every_steps", ">= 0"]),
        (["--preset=nope"], ["--preset=nope", "mnist_fast"]),
        (["--ema_decay=1"], ["--ema_decay=1.0", "[0, 1)"]),
        (["--grad_accum_steps=0"], ["--grad_accum_steps=0", "positive"]),
        (["--global_batch_size=64", "--grad_accum_steps=3"], ["--grad_accum_steps=3", "divisible"]),
        (["--early_stopping_patience=3"], ["--early_stopping_patience=3", "--keep_best="]),
        (
            ["--early_stopping_patience=3", "--keep_best=eval/loss"],
            ["--early_stopping_patience=3", "--eval_every_steps"],
        ),
        (["--export_from=best"], ["--export_from=best", "--keep_best"]),
        (["--keep_best=eval/f1"], ["keep_best", "eval/accuracy"]),
    ],
)
def test_bad_values_raise_one_line_config_errors(argv, words):
    with pytest.raises(ConfigError) as e:
        config_from_argv(["trainer", *argv], check_paths=False)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_python_config_gets_the_same_checks():
    with pytest.raises(ConfigError, match="--global_batch_size=0"):
        validated(Config(global_batch_size=0), check_paths=False)
    with pytest.raises(ConfigError, match="--precision=fp8"):
        validated(Config(precision="fp8"), check_paths=False)


def test_log_every_steps_zero_means_only_at_the_end():
    assert (
        config_from_argv(["trainer", "--log_every_steps=0"], check_paths=False).log_every_steps == 0
    )
    log = periodic.Every(0, last=100)
    assert [s for s in range(101) if log.due(s)] == [100]


def test_preset_loads_from_the_package_and_later_flags_win():
    c = config_from_argv(["trainer", "--preset=mnist_fast", "--epochs=1"], check_paths=False)
    assert c.model == "fast_bn_cnn" and c.lr_schedule == "one_cycle" and c.epochs == 1


def test_help_lists_every_trainer_flag_by_group_and_the_presets():
    from trainer import flags

    text = flags.help_text()
    for field in dataclasses.fields(Config):
        assert f"--{field.name} " in text
    for group in ("Data:", "Output:", "Model and precision:", "Distribution:", "Optimisation:"):
        assert group in text
    assert "mnist_fast" in text and "cats_dogs" in text


def test_init_checkpoint_directory_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        validated(Config(init_checkpoint=str(tmp_path)))


# --- choices ----------------------------------------------------------------------------------


def test_every_builtin_model_and_optimizer_choice_is_implemented():
    from trainer import models, optimizers

    assert set(choices.BUILTIN_MODELS) <= set(models.registered())
    for name in choices.OPTIMIZERS:
        schedule = optimizers.WarmupSchedule("constant", 0.1, 10)
        optimizers.build_optimizer(
            name, schedule, momentum=0.9, weight_decay=0.0, clip_grad_norm=0.0, loss_scaling=False
        )


# --- plan -------------------------------------------------------------------------------------


def test_plan_batch_arithmetic_and_steps():
    topology = Topology("multi_worker", num_workers=2, num_replicas=4, uses_gpu=False)
    config = Config(global_batch_size=64, epochs=2.5)
    plan = resolve_plan(config, topology, _metadata(train=1000), "/data", AVX2_MACHINE)
    assert (plan.per_worker_batch, plan.per_replica_batch) == (32, 16)
    assert plan.total_steps == math.ceil(2.5 * 1000 / 64)
    assert plan.eval_split == "test" and plan.input_shape == (28, 28, 1)
    # 101 test examples in shards of 51 and 50, one shard per worker, 32 per worker batch.
    assert plan.eval_batches_per_worker == 2
    assert plan.xla is False and plan.precision == "fp32"
    assert "2 workers x 2 replicas/worker x 16 per replica" in plan.describe()


def test_plan_train_steps_override_epochs_and_xla_auto_follows_gpus():
    gpu = Topology("mirrored", num_workers=1, num_replicas=2, uses_gpu=True)
    assert (
        resolve_plan(Config(train_steps=7), gpu, _metadata(), "/d", AVX2_MACHINE).total_steps == 7
    )
    assert resolve_plan(Config(), gpu, _metadata(), "/d", AVX2_MACHINE).xla is True
    assert (
        resolve_plan(Config(deterministic=True), gpu, _metadata(), "/d", AVX2_MACHINE).xla is False
    )
    assert resolve_plan(Config(xla="on"), ONE_CPU, _metadata(), "/d", AVX2_MACHINE).xla is True


def _machine(cpu_flags, *gpu_capabilities):
    gpus = tuple(hardware.Gpu(f"GPU {i}", c) for i, c in enumerate(gpu_capabilities))
    return hardware.Machine("test CPU", 2, cpu_flags, "", gpus, "2.x", "3.x")


def test_plan_precision_follows_the_machine_it_was_given():
    one_gpu = Topology("one_device", num_workers=1, num_replicas=1, uses_gpu=True)
    bf16_cpu, no_cpuinfo = _machine(("avx2", "avx512f", "avx512_bf16")), _machine(None)

    def plan(config, topology, machine):
        return resolve_plan(config, topology, _metadata(), "/d", machine)

    auto = Config()
    assert auto.precision == "auto"
    assert plan(auto, ONE_CPU, AVX2_MACHINE).precision == "fp32"
    assert plan(auto, ONE_CPU, bf16_cpu).precision == "bf16"
    assert plan(auto, ONE_CPU, no_cpuinfo).precision == "fp32"
    assert plan(auto, one_gpu, _machine(("avx2",), (8, 6))).precision == "bf16"
    assert plan(auto, one_gpu, _machine(("avx2",), (7, 0))).precision == "fp16"
    assert plan(auto, one_gpu, _machine(("avx2",), (6, 1))).precision == "fp32"
    # GPUs the run does not train on (a CPU topology) do not decide.
    assert plan(auto, ONE_CPU, _machine(("avx2",), (8, 0))).precision == "fp32"
    chosen = plan(auto, ONE_CPU, bf16_cpu)
    assert chosen.precision_warning == ""
    assert "precision bf16 (auto on a CPU with avx512_bf16" in chosen.describe()
    emulated = plan(Config(precision="bf16"), ONE_CPU, AVX2_MACHINE)
    assert emulated.precision == "bf16" and "emulated" in emulated.precision_warning
    # The plan never holds `auto`: the model, the optimizer and summary.json get a real one.
    for machine in (AVX2_MACHINE, bf16_cpu, no_cpuinfo):
        assert plan(auto, ONE_CPU, machine).precision in ("fp32", "fp16", "bf16")


@pytest.mark.parametrize(
    "config, metadata_kwargs, words",
    [
        (Config(global_batch_size=63), {}, ["--global_batch_size=63", "2 replicas"]),
        (Config(global_batch_size=2000), {}, ["larger than the 1000 examples"]),
        (Config(eval_split="validation"), {}, ["--eval_split=validation", "'test', 'train'"]),
        (Config(model="cats_dogs_cnn"), {}, ["150x150x3", "--image_size"]),
        (
            Config(global_batch_size=6, grad_accum_steps=2),
            {},
            ["--global_batch_size=6", "--grad_accum_steps=2 x the 2 replicas"],
        ),
    ],
)
def test_plan_refuses_what_does_not_fit(config, metadata_kwargs, words):
    topology = Topology("mirrored", num_workers=1, num_replicas=2, uses_gpu=False)
    with pytest.raises(ConfigError) as e:
        resolve_plan(config, topology, _metadata(**metadata_kwargs), "/data", AVX2_MACHINE)
    for word in words:
        assert word in str(e.value)


# --- models.resolve_input_shape ---------------------------------------------------------------


def test_resolve_input_shape():
    from trainer.models import resolve_input_shape

    assert resolve_input_shape("lenet", (28, 28, 1), 1, None) == (28, 28, 1)
    assert resolve_input_shape("lenet", (28, 28, 1), 1, (32, 32)) == (32, 32, 1)
    # A fixed-input model takes its own size and channels once resizing is asked for.
    assert resolve_input_shape("cats_dogs_cnn", None, 3, None) == (150, 150, 3)
    assert resolve_input_shape("cats_dogs_cnn", (28, 28, 1), 1, (150, 150)) == (150, 150, 3)
    with pytest.raises(ConfigError, match="vary in size"):
        resolve_input_shape("lenet", None, 3, None)
    with pytest.raises(ConfigError, match="at least 18x18"):
        resolve_input_shape("tutorial_cnn", (8, 8, 1), 1, None)


# --- optimizers.WarmupSchedule ----------------------------------------------------------------


def test_warmup_schedule_shapes():
    from trainer.optimizers import WarmupSchedule

    def rates(schedule, steps):
        return np.array([float(schedule(s)) for s in steps])

    warm = rates(WarmupSchedule("constant", 1.0, 100, warmup_steps=4), range(6))
    np.testing.assert_allclose(warm, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cosine = rates(WarmupSchedule("cosine", 1.0, 100), [0, 50, 100, 150])
    np.testing.assert_allclose(cosine, [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    step = rates(WarmupSchedule("step", 1.0, 100, step_boundaries=(0.5, 0.75)), [49, 50, 74, 75])
    np.testing.assert_allclose(step, [1.0, 0.1, 0.1, 0.01], rtol=1e-6)
    cycle = rates(WarmupSchedule("one_cycle", 1.0, 100), [0, 30, 65, 100])
    np.testing.assert_allclose(cycle, [0.1, 1.0, 0.5, 0.0], atol=1e-6)


# --- periodic ---------------------------------------------------------------------------------


def _actions(log=0, eval_=0, ckpt=0, at=(), last=None):
    done = []
    schedules = {
        "log": periodic.Every(log, last=last),
        "eval": periodic.Every(eval_),
        "checkpoint": periodic.Every(ckpt),
        "profile": periodic.At(at),
    }
    actions = [
        periodic.Action(name, schedule, lambda step, name=name: done.append((name, step)))
        for name, schedule in schedules.items()
    ]
    return actions, done


def test_chunks_end_exactly_where_an_action_is_due():
    actions, _ = _actions(log=30, eval_=45, ckpt=0, at=(7,), last=100)
    stops, step = [], 0
    while step < 100:
        step += periodic.steps_until_next_action(step, 100, 20, actions)
        stops.append(step)
    assert stops == [7, 27, 30, 45, 60, 80, 90, 100]


def test_every_scheduled_action_runs_and_nothing_else():
    actions, done = _actions(log=30, eval_=45, at=(7,), last=100)
    beats = []
    step = 0
    while step < 100:
        step += periodic.steps_until_next_action(step, 100, 20, actions)
        periodic.run_due(actions, step, after_each=beats.append)
    assert done == [
        ("profile", 7),
        ("log", 30),
        ("eval", 45),
        ("log", 60),
        ("log", 90),
        ("eval", 90),
        ("log", 100),
    ]
    assert beats == [s for _, s in done]


def test_resumed_run_takes_the_same_chunks_as_an_uninterrupted_one():
    actions, _ = _actions(log=25, ckpt=40, last=120)

    def chunks(start):
        out, step = [], start
        while step < 120:
            step += periodic.steps_until_next_action(step, 120, 30, actions)
            out.append(step)
        return out

    assert chunks(40) == [s for s in chunks(0) if s > 40]


# --- meter ------------------------------------------------------------------------------------


def test_meter_windows_and_steady_throughput():
    meter = Meter(("loss", "correct", "count", "skipped"), global_batch=10)
    meter.record({"loss": 40.0, "correct": 5.0, "count": 40.0, "skipped": 0.0}, 4, 10.0)  # warm-up
    meter.record({"loss": 20.0, "correct": 30.0, "count": 40.0, "skipped": 1.0}, 4, 1.0)
    window = meter.take_window()
    assert window.loss == pytest.approx(60.0 / 8) and window.accuracy == pytest.approx(35 / 80)
    assert window.images_per_sec == pytest.approx(80 / 11.0)
    assert window.skipped_steps == 1.0
    meter.record({"loss": 2.0, "correct": 9.0, "count": 10.0, "skipped": 0.0}, 1, 0.5)
    assert meter.take_window().accuracy == pytest.approx(0.9)
    assert meter.train_seconds == pytest.approx(11.5) and meter.steps == 9
    assert meter.images_per_sec == pytest.approx(50 / 1.5)  # the first chunk left out


# --- best tracker -----------------------------------------------------------------------------


def test_best_tracker_directions_min_delta_and_patience():
    from trainer.best import BestTracker

    loss = BestTracker("eval/loss", min_delta=0.1, patience=2)
    assert loss.update(10, {"eval/loss": 1.0})  # the first evaluation is always the best so far
    assert not loss.update(20, {"eval/loss": 0.95})  # better, but not by more than min_delta
    assert not loss.should_stop
    assert loss.update(30, {"eval/loss": 0.8})
    assert not loss.update(40, {"eval/loss": 0.9}) and not loss.update(50, {"eval/loss": 0.85})
    assert loss.should_stop
    assert loss.describe() == {"metric": "eval/loss", "value": 0.8, "step": 30}
    accuracy = BestTracker("eval/accuracy")
    assert accuracy.update(1, {"eval/accuracy": 0.5}) and accuracy.update(2, {"eval/accuracy": 0.6})
    assert not accuracy.update(3, {"eval/accuracy": 0.55}) and not accuracy.should_stop
    off = BestTracker("")
    assert not off.update(1, {"eval/loss": 0.1}) and not off.should_stop
