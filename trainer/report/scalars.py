"""The run's TensorBoard scalars, read back with TensorBoard's own event reader.

`plugin_event_accumulator` is what the TensorBoard server uses: it reads every event file of the
directory in order and, like the server, drops the steps a resumed run wrote again after a restart
(`purge_orphaned_data`), so the curves show what TensorBoard shows.
"""

from __future__ import annotations

import os

from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

_SCALARS_PLUGIN = "scalars"


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} for every scalar tag of the event files in `logdir`.

    Empty when `logdir` holds no event files (e.g. a run whose chief wrote elsewhere).
    """
    if not os.path.isdir(logdir):
        return {}
    accumulator = plugin_event_accumulator.EventAccumulator(
        logdir,
        size_guidance={plugin_event_accumulator.TENSORS: 0},  # 0: keep every event
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()[plugin_event_accumulator.TENSORS]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != _SCALARS_PLUGIN:
            continue
        scalars[tag] = [
            (int(event.step), float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in accumulator.Tensors(tag)
        ]
    return scalars
