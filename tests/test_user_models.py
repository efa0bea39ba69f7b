"""Your own model: a module outside the package, named by --model=module:callable or file.py:callable.

The distributed equivalence runs (mirrored, Horovod, MultiWorkerMirrored) live in
test_distributed.py with the other multi-process tests.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import (
    FAST_FLAGS,
    checkpoint_tensors,
    run_trainer,
    run_until_then_sigterm,
    summary,
    write_user_models,
)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("user_code"))
    write_user_models(directory)
    return directory


def _flags(workdir, model, *extra):
    return (*FAST_FLAGS, f"--model={model}", f"--workdir={workdir}", *extra)


def test_file_model_trains_exports_and_the_export_predicts(user_dir, tmp_path):
    workdir = str(tmp_path / "run")
    model = f"{user_dir}/user_models.py:small_cnn"
    run_trainer(*_flags(workdir, model, "--train_steps=40", "--export=true"))
    s = summary(workdir)
    assert s["model"] == model and s["final_step"] == 40 and s["eval"]["accuracy"] > 0.5
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    served = tf.saved_model.load(os.path.join(workdir, "export", "saved_model"))
    probabilities = served.signatures["serving_default"](images=tf.constant(images))
    probabilities = probabilities["probabilities"].numpy()
    import keras

    from datasets.pipeline import normalize

    reloaded = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    expected = tf.nn.softmax(reloaded(normalize(tf.constant(images)), training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_module_model_and_registered_name_on_pythonpath(user_dir, tmp_path):
    env = {"PYTHONPATH": user_dir}
    for model in ("user_models:small_cnn", "user_models:user_registered_cnn"):
        workdir = str(tmp_path / model.replace(":", "_"))
        run_trainer(*_flags(workdir, model, "--train_steps=10", "--precision=bf16"), env=env)
        s = summary(workdir)
        assert s["model"] == model and s["precision"] == "bf16" and s["final_step"] == 10


def test_user_model_resumes_exactly_after_sigterm(user_dir, tmp_path):
    flags = (
        *_flags("", f"{user_dir}/user_models.py:small_cnn"),
        "--train_steps=40",
        "--steps_per_loop=5",
        "--log_every_steps=5",
        "--deterministic",
    )
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_trainer(*flags, f"--workdir={straight}")
    run_until_then_sigterm((*flags, f"--workdir={interrupted}"), "step 10/40")
    run = run_trainer(*flags, f"--workdir={interrupted}")
    assert "resumed from" in run.stderr
    resumed, uninterrupted = (
        checkpoint_tensors(tf.train.latest_checkpoint(os.path.join(w, "checkpoints")))
        for w in (interrupted, straight)
    )
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


@pytest.mark.parametrize(
    "model, words",
    [
        ("no_such_pkg.models:cnn", ["cannot import no_such_pkg.models", "No module named"]),
        ("{dir}/missing.py:cnn", ["missing.py", "no such file"]),
        ("{dir}/user_models.py:nope", ["has no callable 'nope'", "user_registered_cnn"]),
        ("{dir}/user_models.py:NOT_CALLABLE", ["NOT_CALLABLE is a int"]),
        ("{dir}/user_models.py:raises", ["builder raised RuntimeError: out of ideas"]),
        ("{dir}/user_models.py:returns_a_layer", ["returned a Dense", "keras.Model"]),
        ("{dir}/user_models.py:wrong_outputs", ["expected [batch, 10] logits"]),
        ("{dir}/user_models.py:fixed_input", ["(32, 32, 3)", "28x28x1", "--image_size"]),
        ("vgg19", ["--model=vgg19", "unknown", "module:callable"]),
    ],
)
def test_bad_user_model_is_one_error_line_before_training(user_dir, tmp_path, model, words):
    workdir = str(tmp_path / "run")
    result = run_trainer(*_flags(workdir, model.format(dir=user_dir)), check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
