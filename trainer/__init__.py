"""convoy trainer: flags -> config -> backend -> compiled steps -> loop -> checkpoints, TensorBoard, export.

The Python API, for training from a script or notebook instead of the command line:

    from trainer import Config, train_and_evaluate
    summary = train_and_evaluate(Config(model="lenet", data_dir="data/mnist", epochs=3))

`Config` has the same fields and defaults as the flags and goes through the same checks;
`register` adds a model builder under a name. TensorFlow loads only when `train_and_evaluate` or
`register` is first used, so `import trainer` stays cheap.
"""

from trainer.config import Config, ConfigError

__all__ = ["Config", "ConfigError", "register", "train_and_evaluate"]


def __getattr__(name):
    if name == "train_and_evaluate":
        from trainer.loop import train_and_evaluate

        return train_and_evaluate
    if name == "register":
        from trainer.models import register

        return register
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
