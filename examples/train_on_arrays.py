"""Train convoy on your own numpy arrays from Python: write_arrays -> Config -> train_and_evaluate.

    python examples/train_on_arrays.py --workdir=runs/arrays            # the MNIST sample
    python examples/train_on_arrays.py --npz=my_data.npz --epochs=10    # your own arrays

`--npz` takes a `numpy.savez` file in the keras.datasets layout (`x_train`, `y_train`, `x_test`,
`y_test`; uint8 images [N, H, W] or [N, H, W, C], integer labels). Without it the script uses the
real MNIST sample convoy ships, read into arrays, so it runs anywhere. The model is the user
module next to this file (`resnet_tiny.py`); any `module:callable` works the same way.

The dataset is written once into WORKDIR/data (a re-run finds it up to date), then trained and
evaluated with the same harness as `python -m trainer`: every flag is a `Config` field with the
same default and the same checks.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import datasets
from datasets import embedded, idx
from trainer import Config, train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def load_arrays(npz_path: str | None):
    """(x_train, y_train), (x_test, y_test) as numpy arrays: yours, or the shipped MNIST sample."""
    if npz_path:
        with np.load(npz_path) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    sample = idx.read(embedded.SAMPLE_DIR)  # The sample's IDX files, as uint8 arrays.
    train, test = sample.splits["train"], sample.splits["test"]
    return (train.images, train.labels), (test.images, test.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", help="numpy.savez file with x_train, y_train, x_test, y_test")
    parser.add_argument("--workdir", default="runs/arrays")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--train_steps", type=int, default=0, help="overrides --epochs when > 0")
    parser.add_argument("--model", default=f"{HERE}/resnet_tiny.py:resnet_tiny")
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = load_arrays(args.npz)
    data_dir = os.path.join(args.workdir, "data")
    datasets.write_arrays(
        {"train": x_train, "test": x_test},
        {"train": y_train, "test": y_test},
        data_dir,
    )
    config = Config(
        model=args.model,
        data_dir=data_dir,
        workdir=os.path.join(args.workdir, "run"),
        epochs=args.epochs,
        train_steps=args.train_steps,
        global_batch_size=128,
        learning_rate=2e-3,
        lr_schedule="one_cycle",
    )
    summary = train_and_evaluate(config)
    print(json.dumps({"eval": summary["eval"], "export": summary.get("export")}))


if __name__ == "__main__":
    main()
