"""Evaluation during and after training: exact metrics, EMA and raw weights, history, best.

Each evaluation reads every example of the eval split exactly once across workers (padding is
weighted 0) and all-reduces the sums, so every worker gets identical numbers. With --ema_decay
the model is evaluated twice: with the moving-average weights (reported as eval/accuracy,
eval/loss, and what --keep_best watches) and with the raw weights (eval/accuracy_raw,
eval/loss_raw). The confusion matrix of each evaluation (of the weights eval/accuracy reports)
goes to TensorBoard as an image and a table of counts. Each result joins the history with the
training seconds spent so far (summary.json `eval_history`, for time-to-accuracy), then updates
the best-so-far tracker, which saves the best checkpoint when it improves.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from datasets.errors import DataError
from trainer import errors, replicas
from trainer import step as step_lib
from trainer.backends.base import Backend
from trainer.checkpoints import Checkpointer
from trainer.inputs import InputSpec
from trainer.meter import Meter
from trainer.plan import Plan
from trainer.state import TrainState
from trainer.summaries import Summaries


class Evaluator:
    def __init__(
        self,
        plan: Plan,
        backend: Backend,
        state: TrainState,
        inputs: InputSpec,
        loops: step_lib.Loops,
        summaries: Summaries,
        checkpointer: Checkpointer,
        meter: Meter,
    ):
        self._plan, self._backend, self._state = plan, backend, state
        self._inputs, self._loops, self._summaries = inputs, loops, summaries
        self._checkpointer, self._meter = checkpointer, meter
        self.history: list[dict] = []
        self.last_step: int | None = None
        self.last: dict | None = None
        self.confusion = None  # the last evaluation's [true, predicted] counts, when summed

    def __call__(self, step: int) -> dict:
        """Evaluates at `step`, logs and records it, keeps the best; returns the result."""
        if step == self.last_step:
            return self.last  # e.g. the final evaluation right after an early stop's
        # Every replica evaluates with the same (mean) moving statistics: the numbers reported
        # are those of the model that is saved and exported.
        replicas.average_statistics(self._backend, self._state.model)
        result = self._evaluate()
        if self._state.averages is not None:
            raw = result
            with self._state.averaged_weights():
                result = self._evaluate()
            result.update(loss_raw=raw["loss"], accuracy_raw=raw["accuracy"])
        logging.info("eval at step %d: %s", step, format_result(result))
        self._summaries.scalars(
            step, {f"eval/{k}": v for k, v in result.items() if k != "num_examples"}
        )
        if self.confusion is not None:
            self._summaries.confusion_matrix(
                step, self.confusion, self._inputs.metadata.class_names
            )
        self.history.append(
            {"step": step, "train_seconds": round(self._meter.train_seconds, 3), **result}
        )
        if self._state.best.update(step, {f"eval/{k}": v for k, v in result.items()}):
            self._checkpointer.save_best()
        self.last_step, self.last = step, result
        return result

    def _evaluate(self) -> dict:
        plan, metadata = self._plan, self._inputs.metadata
        dataset_fn = self._inputs.evaluation(plan.eval_split, plan.eval_batches_per_worker)
        with errors.reading_split(metadata, plan.data_dir, plan.eval_split):
            iterator = iter(self._backend.distribute(dataset_fn, plan.per_worker_batch))
            sums = self._loops.evaluate(iterator, tf.constant(plan.eval_batches_per_worker))
            sums = {k: np.asarray(v) for k, v in sums.items()}
        count = float(sums["count"])
        promised = metadata.num_examples(plan.eval_split)
        if round(count) != promised:
            # Never report an accuracy over fewer examples than the dataset says it has.
            raise DataError(
                f"{plan.data_dir}: split '{plan.eval_split}' yielded {round(count)} examples; "
                f"metadata.json promises {promised} (a truncated shard?); check it with "
                f"`python -m datasets.verify --data_dir={plan.data_dir}`"
            )
        self.confusion = np.asarray(sums["confusion"]) if "confusion" in sums else None
        return {
            "loss": float(sums["loss_sum"]) / count,
            "accuracy": float(sums["correct"]) / count,
            "num_examples": int(round(count)),
        }


def format_result(result: dict) -> str:
    text = (
        f"loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
        f"over {result['num_examples']} examples"
    )
    if "accuracy_raw" in result:
        text += f" (EMA weights; raw: loss {result['loss_raw']:.4f} "
        text += f"accuracy {result['accuracy_raw']:.4f})"
    return text
