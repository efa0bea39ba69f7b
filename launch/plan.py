"""Scaling planner: what N GPUs would give, from a measured (or stated) one-GPU step and the network.

    python -m launch.plan --per_gpu_images_per_sec=2375 --params=25.6e6 --per_gpu_batch=256 \\
        --node=dgx-a100 --gpus=1,8,64,512 [--overlap] [--json] [--plot=FILE.png]
    python -m launch.plan --from_run=runs/x --node=hgx-h100 --nodes=4
    python -m launch.plan --model=resnet50 --input_shape=224,224,3 --num_classes=1000 ...

Pure Python (no TensorFlow) except `--model`, which builds the model with Keras to count its
parameters, and `--plot`, which imports matplotlib. Prints one row per size: images/s, scaling
efficiency, seconds per epoch and the bound; `--json` prints one JSON line instead. Bad input is
one `error: launch.plan: --flag...` line and exit 2 (trainer/exit_codes.py: a usage error).

## The model (every time in ms, per step, for one GPU of N)

Sizes. N GPUs fill `nodes = ceil(N / g)` nodes of g = `--gpus_per_node` (N must be a multiple of g
beyond one node); `gpus_on_node = min(N, g)`. Per-GPU batch b = `--per_gpu_batch` (weak scaling) or
`--global_batch / N` (strong scaling; it must divide, and be >= 1 per GPU).

Compute. `t_compute = b * ms_per_image`, with `ms_per_image = 1000 / --per_gpu_images_per_sec`
(the one-GPU rate includes the optimizer), or `--compute_ms / b_ref` and `t_opt = --optimizer_ms`
when the forward+backward time of a step of b_ref images is known (a run's time breakdown). A
per-GPU rate that stays constant as b changes is an assumption: a GPU slows down at small batches.

All-reduce of S = params * `--grad_bytes_per_param` bytes (4 for fp32, 2 for fp16/bf16
all-reduce), or a run's `gradient_bytes`:

- Ring all-reduce over n ranks of a link of bus bandwidth B with per-hop latency alpha:
  `t_ring(s, n) = 2(n-1)/n * s / B + 2(n-1) * alpha`
  (each rank sends and receives 2(n-1)/n of the buffer in 2(n-1) steps: reduce-scatter, then
  all-gather). B is NCCL's "bus bandwidth", the figure nccl-tests' all_reduce_perf prints as
  busbw = algbw * 2(n-1)/n (NVIDIA/nccl-tests doc/PERFORMANCE.md), so a measured busbw plugs in
  directly. alpha per hop and a base cost per call are NCCL's own tuning model: ring/Simple
  hwLat 3.4 us over NVLink, 5.7 us over PCIe, 14.0 us over the network, baseLat 8.4 us
  (NVIDIA/nccl src/graph/tuning.cc, ncclTopoTuneModel: latency = baseLat + intra steps * intra
  hwLat + inter steps * net hwLat, 2(n-1) steps for a ring all-reduce).
- Hierarchical across nodes (Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE, NCCL's intra/inter split):
  reduce-scatter inside the node over NVLink, a ring over the k nodes' NICs on each GPU's 1/g
  shard (the g shards in parallel, sharing the node's NICs), all-gather inside the node:
  `t_ar(s) = base + t_ring_intra(s, g) + [k > 1] * (2(k-1)/k * s / B_node + 2(k-1) * alpha_net)`
  where B_node is the node's total NIC bandwidth: g shards of s/g bytes over g NICs of B_node/g
  take the time of one s over B_node. Link bandwidths are nominal rates (`--intra_node_gbps`,
  `--inter_node_gbps`, or a `--node` preset) times an achievable fraction (`--intra_node_efficiency`,
  `--inter_node_efficiency`, defaults below with their sources). `--allreduce_gbps` (a measured
  bus bandwidth) with `--allreduce_alpha_us` replaces all this with one flat ring over N ranks:
  what a loopback calibration measures.
- Gradient fusion: the gradients go in `m = ceil(S / F)` all-reduces of F = `--fusion_mb` MiB
  (Horovod's Tensor Fusion buffer, HOROVOD_FUSION_THRESHOLD, 64 MiB by default before Horovod
  0.21, 128 MiB since: horovod docs/tensor-fusion.rst, CHANGELOG 0.21.0). Each pays the base and
  per-hop latencies: `t_allreduce = m * t_ar(S / m)`.
- Overlap. convoy today starts the all-reduce after the whole backward pass (trainer/step: the
  per-replica gradients come out of the compiled step, then one grouped all-reduce), so nothing is
  hidden: `exposed = t_allreduce` (the default, `--nooverlap`). With `--overlap` (Horovod's and
  tf_cnn_benchmarks' behaviour: a gradient is reduced as soon as it and its fusion buffer are
  ready) the gradients are taken to become ready evenly over the backward pass,
  `t_bwd = --backward_fraction * t_compute`, and buffer i of m can start at i/m of it, after
  buffer i-1. The all-reduce then ends at `max_i(t_bwd * i/m + (m-i+1) * t_allreduce/m)`, which
  is linear in i, so an end point: `exposed = max(t_allreduce / m, t_allreduce - t_bwd * (1 -
  1/m))`. The backward pass costs about twice the forward (it computes the gradients with
  respect to both the activations and the weights: the "6N = 2N forward + 4N backward" FLOP count
  of Kaplan et al. 2020, Scaling Laws for Neural Language Models, sec. 2.1), hence the default
  backward_fraction = 2/3.
- Input. Each node's input pipeline delivers at most I = `--input_images_per_sec_per_node`
  images/s (prefetched, so it runs alongside the step): `t_input = b * gpus_on_node / I`.

Step and figures: `t_step = max(t_compute + exposed + t_opt, t_input)`; images/s = N * b / t_step;
efficiency(N) = images/s(N) / (N * images/s(1)) with images/s(1) from the same model at N = 1 (no
all-reduce); seconds per epoch = `--epoch_images` / images/s (default: ImageNet-1k's 1,281,167
training images). The bound is the largest part of t_step: `compute` (forward, backward,
optimizer), `intra_node_allreduce` / `inter_node_allreduce` (the exposed all-reduce's bandwidth
terms) / `allreduce_latency` (its alpha terms), or `input` when the pipeline is the limit; the
loss is the largest part beyond compute, what costs the efficiency (`none` when nothing does).

## `--from_run=WORKDIR`

Reads WORKDIR/summary.json, which must hold:

- `time_breakdown.compute_ms`: forward + backward of one step on one replica, ms;
- `time_breakdown.optimizer_ms`: the optimizer's update of one step, ms;
- `time_breakdown.allreduce_ms`: the gradient all-reduce of one step, ms (compared, not used);
- `time_breakdown.step_ms`: the whole step, ms (compared, not used);
- `time_breakdown.input_images_per_sec`: what the input pipeline alone delivers on the run's
  machine, images/s, taken as the per-node input limit (a node like the run's machine); the run
  measures its chief's own pipeline, per worker, while every worker measures at once, so with
  several workers on a node this is conservative;
- `per_replica_batch`, `num_replicas`;
- `gradient_bytes`: the bytes of one set of gradients at the all-reduce's dtype.

It replaces --per_gpu_images_per_sec (or --compute_ms), --params / --model and --per_gpu_batch;
`--input_images_per_sec_per_node` overrides its input rate. The output then adds `run`: the
measured step and all-reduce time and images/s against the model's at the run's num_replicas.

## Calibration on this machine

`benchmarks/scaling.py` sweeps one tensor of several sizes through Horovod (Gloo) and
MultiWorkerMirrored all-reduces between 2 local processes and fits the ring formula to them
(`fit_ring`): the `--allreduce_gbps` and `--allreduce_alpha_us` of loopback here. With the
one-thread process as one "GPU" (`--per_gpu_images_per_sec`, `--gpus_per_node=2`) the planner
predicts the two-process throughput, which the same benchmark measures; `--from_run` with a run's
time breakdown replaces the one-thread rate with the run's own compute.

`plan(inputs, gpus)` and the formulas are importable and pure; `benchmarks/plan_check.py` checks
them against published figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

from absl import flags

from launch.cli import print_help_if_asked
from trainer.exit_codes import EXIT_USAGE

# --- constants, each with its source ----------------------------------------------------------

# NCCL's latency model (NVIDIA/nccl src/graph/tuning.cc: baseLat and hwLat, ring algorithm,
# Simple protocol, the one large all-reduces use), in microseconds.
NCCL_BASE_LATENCY_US = 8.4  # baseLat[RING][SIMPLE], paid once per all-reduce call
NCCL_NVLINK_HOP_US = 3.4  # hwLat[NVLINK][RING][SIMPLE], per ring step inside a node
NCCL_PCIE_HOP_US = 5.7  # hwLat[PCI][RING][SIMPLE]
NCCL_NET_HOP_US = 14.0  # hwLat[NET][RING][SIMPLE], per ring step between nodes

# Achievable share of a link's nominal rate for a large all-reduce (busbw / nominal):
# - inside a node: nccl-tests all_reduce_perf on 8x A100 SXM4 (NVLink3, 300 GB/s per direction)
#   measures busbw ~200-208 GB/s (NVIDIA/nccl-tests issues #149 and #178): 0.67-0.69; NCCL's own
#   topology model rates PCIe Gen3 x16 (15.75 GB/s nominal) at 12 GB/s (src/graph/topo.h PCI_BW):
#   0.76. One figure for both: 0.7.
# - between nodes: 3 nodes of 8x A100 with 4x HDR 200 Gb/s each (100 GB/s per node) measure
#   busbw 84.8 GB/s on average, 96 at peak (NVIDIA/nccl-tests issue #119): 0.85.
INTRA_NODE_EFFICIENCY = 0.7
INTER_NODE_EFFICIENCY = 0.85

# Horovod's Tensor Fusion buffer before 0.21 (the era of every published figure checked here),
# docs/tensor-fusion.rst; 0.21.0 raised it to 128 MiB (CHANGELOG: #2468).
FUSION_MB = 64.0
# Backward ~ 2x forward (Kaplan et al. 2020, sec. 2.1: 2N forward + 4N backward FLOPs per sample).
BACKWARD_FRACTION = 2.0 / 3.0
# ILSVRC-2012 (ImageNet-1k) training set.
IMAGENET_TRAIN_IMAGES = 1_281_167

GBIT = 1e9 / 8  # bytes per second in one Gb/s; every *_gbps flag is in gigabits per second
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Node:
    """A node kind: GPUs, NVLink per GPU per direction, and its compute NICs in total."""

    name: str
    gpus: int
    intra_node_gbps: float  # per GPU, one direction
    inter_node_gbps: float  # the node's NICs together
    intra_node_alpha_us: float
    source: str


NODES = {
    n.name: n
    for n in (
        Node(
            "dgx1-p100",
            8,
            4 * 20 * 8,  # NVLink 1.0: 4 links x 20 GB/s per direction per P100
            4 * 100,  # 4x EDR InfiniBand 100 Gb/s
            NCCL_NVLINK_HOP_US,
            "NVIDIA Tesla P100 whitepaper (GP100: 4 NVLinks, 160 GB/s bidirectional); NVIDIA "
            "DGX-1 datasheet (8x P100, hybrid cube-mesh NVLink, 4x 100 Gb/s EDR InfiniBand)",
        ),
        Node(
            "dgx-a100",
            8,
            12 * 25 * 8,  # NVLink 3: 12 links x 25 GB/s per direction = 300 GB/s per A100
            8 * 200,  # 8x HDR InfiniBand 200 Gb/s (compute fabric; storage NICs not counted)
            NCCL_NVLINK_HOP_US,
            "NVIDIA A100 Tensor Core GPU architecture whitepaper (12 NVLinks, 600 GB/s "
            "bidirectional); NVIDIA DGX A100 datasheet (8x A100, NVSwitch, 8x 200 Gb/s HDR "
            "ConnectX-6 for the compute fabric)",
        ),
        Node(
            "hgx-h100",
            8,
            18 * 25 * 8,  # NVLink 4: 18 links x 25 GB/s per direction = 450 GB/s per H100
            8 * 400,  # 8x NDR 400 Gb/s ConnectX-7
            NCCL_NVLINK_HOP_US,
            "NVIDIA H100 Tensor Core GPU architecture whitepaper (18 NVLinks, 900 GB/s "
            "bidirectional); NVIDIA DGX H100 datasheet (8x H100 SXM5, 8x 400 Gb/s ConnectX-7)",
        ),
        Node(
            "hgx-h200",
            8,
            18 * 25 * 8,  # the same NVLink 4 as H100: 900 GB/s bidirectional
            8 * 400,  # 8x 400 Gb/s ConnectX-7
            NCCL_NVLINK_HOP_US,
            "NVIDIA H200 Tensor Core GPU datasheet (NVLink 900 GB/s); NVIDIA DGX H200 "
            "datasheet (8x H200, 8x 400 Gb/s ConnectX-7 for the compute fabric)",
        ),
    )
}


class PlanError(ValueError):
    """Impossible or missing input; the message names the flag and what was expected."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything the model needs, in its own units (ms, bytes, bytes/ms)."""

    ms_per_image: float  # forward + backward (+ the optimizer when optimizer_ms is 0)
    gradient_bytes: float
    per_gpu_batch: int | None = None  # weak scaling
    global_batch: int | None = None  # strong scaling
    optimizer_ms: float = 0.0
    gpus_per_node: int = 8
    intra_node_gbps: float | None = None  # nominal, per GPU per direction
    inter_node_gbps: float | None = None  # nominal, the node's NICs together
    intra_node_efficiency: float = INTRA_NODE_EFFICIENCY
    inter_node_efficiency: float = INTER_NODE_EFFICIENCY
    intra_node_alpha_us: float = NCCL_NVLINK_HOP_US
    inter_node_alpha_us: float = NCCL_NET_HOP_US
    allreduce_base_us: float = NCCL_BASE_LATENCY_US
    allreduce_gbps: float | None = None  # measured bus bandwidth: one flat ring over N
    allreduce_alpha_us: float | None = None
    fusion_mb: float = FUSION_MB
    overlap: bool = False
    backward_fraction: float = BACKWARD_FRACTION
    input_images_per_sec_per_node: float | None = None
    epoch_images: int = IMAGENET_TRAIN_IMAGES


@dataclasses.dataclass(frozen=True)
class Row:
    gpus: int
    nodes: int
    per_gpu_batch: int
    images_per_sec: float
    efficiency: float
    seconds_per_epoch: float
    step_ms: float
    compute_ms: float  # forward + backward + optimizer
    allreduce_ms: float  # the whole all-reduce, hidden or not
    exposed_allreduce_ms: float
    input_ms: float  # 0: no input limit given
    bound: str  # the largest part of the step
    loss: str  # the part beyond compute that costs the most efficiency ("none")

    def as_json(self) -> dict:
        return {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(self).items()
        }


# --- the formulas -----------------------------------------------------------------------------


def ring_ms(size_bytes: float, ranks: int, bus_bytes_per_ms: float, alpha_us: float) -> tuple:
    """Ring all-reduce of `size_bytes` over `ranks`: (bandwidth ms, latency ms).

    2(n-1)/n * S / B + 2(n-1) * alpha: NCCL's bus-bandwidth convention (nccl-tests
    doc/PERFORMANCE.md) and per-step latency (src/graph/tuning.cc).
    """
    if ranks <= 1:
        return 0.0, 0.0
    return (
        2 * (ranks - 1) / ranks * size_bytes / bus_bytes_per_ms,
        2 * (ranks - 1) * alpha_us / 1000,
    )


def allreduce_parts(inputs: Inputs, gpus: int) -> dict:
    """One step's all-reduce on `gpus` GPUs: {'intra', 'inter', 'latency': ms, 'calls': m}."""
    parts = {"intra": 0.0, "inter": 0.0, "latency": 0.0, "calls": 0}
    if gpus <= 1 or inputs.gradient_bytes <= 0:
        return parts
    calls = max(1, math.ceil(inputs.gradient_bytes / (inputs.fusion_mb * MIB)))
    chunk = inputs.gradient_bytes / calls
    parts["calls"] = calls
    parts["latency"] = calls * inputs.allreduce_base_us / 1000
    if inputs.allreduce_gbps:  # measured: one flat ring over every rank
        bw, lat = ring_ms(
            chunk, gpus, inputs.allreduce_gbps * GBIT / 1000, inputs.allreduce_alpha_us or 0.0
        )
        parts["intra" if gpus <= inputs.gpus_per_node else "inter"] = calls * bw
        parts["latency"] += calls * lat
        return parts
    on_node = min(gpus, inputs.gpus_per_node)
    nodes = math.ceil(gpus / inputs.gpus_per_node)
    if on_node > 1:
        bw, lat = ring_ms(
            chunk,
            on_node,
            inputs.intra_node_gbps * inputs.intra_node_efficiency * GBIT / 1000,
            inputs.intra_node_alpha_us,
        )
        parts["intra"] = calls * bw
        parts["latency"] += calls * lat
    if nodes > 1:
        bw, lat = ring_ms(
            chunk,
            nodes,
            inputs.inter_node_gbps * inputs.inter_node_efficiency * GBIT / 1000,
            inputs.inter_node_alpha_us,
        )
        parts["inter"] = calls * bw
        parts["latency"] += calls * lat
    return parts


def exposed_ms(allreduce_ms: float, calls: int, backward_ms: float, overlap: bool) -> float:
    """The part of the all-reduce the step waits for.

    Without overlap (convoy: the all-reduce starts after the backward pass) all of it. With it,
    buffer i of m is ready at i/m of the backward pass: max(t/m, t - t_bwd * (1 - 1/m)).
    """
    if not overlap or calls <= 1:
        return allreduce_ms
    return max(allreduce_ms / calls, allreduce_ms - backward_ms * (1 - 1 / calls))


def _per_gpu_batch(inputs: Inputs, gpus: int) -> int:
    if inputs.global_batch is None:
        return inputs.per_gpu_batch
    if inputs.global_batch < gpus:
        raise PlanError(
            f"--global_batch={inputs.global_batch} is smaller than the {gpus} replicas of the "
            f"{gpus}-GPU row: every replica needs at least one image"
        )
    if inputs.global_batch % gpus:
        raise PlanError(
            f"--global_batch={inputs.global_batch} does not divide by {gpus} GPUs: expected a "
            "multiple of every size in --gpus"
        )
    return inputs.global_batch // gpus


def _step(inputs: Inputs, gpus: int) -> dict:
    batch = _per_gpu_batch(inputs, gpus)
    forward_backward = batch * inputs.ms_per_image
    compute = forward_backward + inputs.optimizer_ms
    parts = allreduce_parts(inputs, gpus)
    total = parts["intra"] + parts["inter"] + parts["latency"]
    exposed = exposed_ms(
        total, parts["calls"], inputs.backward_fraction * forward_backward, inputs.overlap
    )
    on_node = min(gpus, inputs.gpus_per_node)
    rate = inputs.input_images_per_sec_per_node
    input_ms = 1000 * batch * on_node / rate if rate else 0.0
    step = max(compute + exposed, input_ms)
    share = exposed / total if total else 0.0
    candidates = {
        "compute": compute,
        "intra_node_allreduce": parts["intra"] * share,
        "inter_node_allreduce": parts["inter"] * share,
        "allreduce_latency": parts["latency"] * share,
    }
    bound = "input" if input_ms > compute + exposed else max(candidates, key=candidates.get)
    # What costs efficiency: the input's wait, else the largest exposed all-reduce term.
    losses = {k: v for k, v in candidates.items() if k != "compute" and v > 0}
    if input_ms > compute + exposed:
        loss = "input"
    else:
        loss = max(losses, key=losses.get) if losses else "none"
    return {
        "batch": batch,
        "step": step,
        "compute": compute,
        "allreduce": total,
        "exposed": exposed,
        "input": input_ms,
        "bound": bound,
        "loss": loss,
    }


def check_sizes(inputs: Inputs, gpus: Sequence[int]) -> None:
    """Raises PlanError for sizes the model cannot place."""
    if not gpus:
        raise PlanError("--gpus: expected at least one size, e.g. --gpus=1,8,64")
    for n in gpus:
        if n < 1:
            raise PlanError(f"--gpus={','.join(map(str, gpus))}: every size must be >= 1 GPU")
        if n > inputs.gpus_per_node and n % inputs.gpus_per_node:
            raise PlanError(
                f"--gpus: {n} GPUs is not a multiple of --gpus_per_node={inputs.gpus_per_node} "
                "(beyond one node, nodes are used whole)"
            )
        if inputs.allreduce_gbps:
            continue
        if min(n, inputs.gpus_per_node) > 1 and not inputs.intra_node_gbps:
            raise PlanError(
                f"{n} GPUs share a node: give --intra_node_gbps, a --node preset, or a measured "
                "--allreduce_gbps"
            )
        if n > inputs.gpus_per_node and not inputs.inter_node_gbps:
            raise PlanError(
                f"{n} GPUs span nodes: give --inter_node_gbps, a --node preset, or a measured "
                "--allreduce_gbps"
            )


def plan(inputs: Inputs, gpus: Sequence[int]) -> list[Row]:
    """One Row per size in `gpus`; raises PlanError for impossible sizes or batches."""
    check_sizes(inputs, gpus)
    one = _step(inputs, 1)
    one_rate = 1000 * one["batch"] / one["step"]
    rows = []
    for n in gpus:
        s = _step(inputs, n)
        rate = 1000 * n * s["batch"] / s["step"]
        rows.append(
            Row(
                gpus=n,
                nodes=math.ceil(n / inputs.gpus_per_node),
                per_gpu_batch=s["batch"],
                images_per_sec=rate,
                efficiency=rate / (n * one_rate),
                seconds_per_epoch=inputs.epoch_images / rate,
                step_ms=s["step"],
                compute_ms=s["compute"],
                allreduce_ms=s["allreduce"],
                exposed_allreduce_ms=s["exposed"],
                input_ms=s["input"],
                bound=s["bound"],
                loss=s["loss"],
            )
        )
    return rows


def fit_ring(ms_by_bytes: dict, ranks: int = 2) -> dict:
    """A measured all-reduce sweep {bytes: ms} -> {'bus_gbps', 'alpha_us'} for --allreduce_*.

    Least squares of t = 2(n-1)/n * S / B + 2(n-1) * alpha (ring_ms) over the sizes, weighted by
    1/t^2 (relative errors) so that the small sizes, which decide alpha, count as much as the
    large ones, which decide B. bus_gbps is None when the times do not grow with the size.
    """
    if len(ms_by_bytes) < 2:
        return {"bus_gbps": None, "alpha_us": None}
    xs = [2 * (ranks - 1) / ranks * float(x) for x in ms_by_bytes]
    ys = [float(y) for y in ms_by_bytes.values()]
    ws = [1 / y**2 for y in ys]
    total = sum(ws)
    mean_x = sum(w * x for w, x in zip(ws, xs)) / total
    mean_y = sum(w * y for w, y in zip(ws, ys)) / total
    spread = sum(w * (x - mean_x) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(ws, xs, ys)) / spread
    intercept = mean_y - slope * mean_x
    return {
        # slope in ms per byte: B = 1 / slope bytes per ms, in Gb/s.
        "bus_gbps": round(1000 / slope / GBIT, 3) if slope > 0 else None,
        "alpha_us": round(1000 * intercept / (2 * (ranks - 1)), 1),
    }


# --- inputs from a run and from the model zoo -------------------------------------------------

RUN_KEYS = (
    "time_breakdown.compute_ms",
    "time_breakdown.optimizer_ms",
    "time_breakdown.allreduce_ms",
    "time_breakdown.step_ms",
    "time_breakdown.input_images_per_sec",
    "per_replica_batch",
    "num_replicas",
    "gradient_bytes",
)


def read_run(workdir: str) -> dict:
    """The RUN_KEYS of WORKDIR/summary.json, flattened ('time_breakdown.compute_ms': ...)."""
    path = os.path.join(workdir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise PlanError(
            f"--from_run={workdir}: no summary.json in it (is it a run's workdir?)"
        ) from None
    except (OSError, ValueError) as e:
        raise PlanError(f"--from_run={workdir}: cannot read summary.json ({e})") from None
    found = {}
    for key in RUN_KEYS:
        value = summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise PlanError(
                f"--from_run={workdir}: summary.json has no number at {key!r} (a run with the "
                "step's time breakdown writes it)"
            )
        found[key] = float(value)
    for key in ("per_replica_batch", "num_replicas", "time_breakdown.compute_ms"):
        if found[key] <= 0:
            raise PlanError(f"--from_run={workdir}: summary.json's {key!r} must be > 0")
    return found


def count_params(model: str, input_shape: tuple, num_classes: int) -> int:
    """Trainable parameters of a model-zoo builder (imports Keras, hence TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep an error to its one line
    from trainer.config import ConfigError
    from trainer.models import build_model

    try:
        built = build_model(model, tuple(input_shape), num_classes)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    return int(sum(math.prod(w.shape) for w in built.trainable_weights))


# --- the command line -------------------------------------------------------------------------

_FLAGS = flags.FlagValues()  # private: must not collide with the trainer's global flags
_f = dict(flag_values=_FLAGS)
flags.DEFINE_float(
    "per_gpu_images_per_sec", None, "One GPU's training rate (images/s), optimizer included.", **_f
)
flags.DEFINE_float(
    "compute_ms", None, "Forward+backward ms of one step of --per_gpu_batch (instead).", **_f
)
flags.DEFINE_float("optimizer_ms", 0.0, "The optimizer's ms per step (with --compute_ms).", **_f)
flags.DEFINE_string("from_run", None, "A run's workdir: its summary.json gives the inputs.", **_f)
flags.DEFINE_float("params", None, "Trainable parameters (e.g. 25.6e6).", **_f)
flags.DEFINE_string("model", None, "A model-zoo name (trainer/models.py) to count params.", **_f)
flags.DEFINE_list("input_shape", None, "H,W,C for --model.", **_f)
flags.DEFINE_integer("num_classes", None, "Classes for --model.", **_f)
flags.DEFINE_integer(
    "grad_bytes_per_param", 4, "4: fp32 all-reduce; 2: fp16/bf16 (--fp16_allreduce).", **_f
)
flags.DEFINE_integer("per_gpu_batch", None, "Images per GPU per step (weak scaling).", **_f)
flags.DEFINE_integer("global_batch", None, "Images per step over all GPUs (strong scaling).", **_f)
flags.DEFINE_string("node", None, f"A node preset: {', '.join(NODES)}.", **_f)
flags.DEFINE_integer("gpus_per_node", None, "GPUs per node (default: the preset's, else 8).", **_f)
flags.DEFINE_integer("nodes", None, "Plan 1 GPU, one node and this many nodes.", **_f)
flags.DEFINE_list("gpus", None, "Sizes to plan, e.g. 1,8,64,512.", **_f)
flags.DEFINE_float("intra_node_gbps", None, "NVLink/PCIe per GPU per direction, Gb/s.", **_f)
flags.DEFINE_float("inter_node_gbps", None, "A node's NICs together, Gb/s.", **_f)
flags.DEFINE_float(
    "intra_node_efficiency", INTRA_NODE_EFFICIENCY, "Achievable share of intra_node_gbps.", **_f
)
flags.DEFINE_float(
    "inter_node_efficiency", INTER_NODE_EFFICIENCY, "Achievable share of inter_node_gbps.", **_f
)
flags.DEFINE_float(
    "intra_node_alpha_us", None, "Per-hop latency inside a node (NVLink 3.4, PCIe 5.7).", **_f
)
flags.DEFINE_float("inter_node_alpha_us", NCCL_NET_HOP_US, "Per-hop latency between nodes.", **_f)
flags.DEFINE_float(
    "allreduce_base_us", NCCL_BASE_LATENCY_US, "Latency paid once per all-reduce call.", **_f
)
flags.DEFINE_float(
    "allreduce_gbps", None, "A measured all-reduce bus bandwidth, Gb/s: one flat ring.", **_f
)
flags.DEFINE_float("allreduce_alpha_us", None, "Measured per-hop latency (with the above).", **_f)
flags.DEFINE_float("fusion_mb", FUSION_MB, "Gradient fusion buffer, MiB.", **_f)
flags.DEFINE_boolean(
    "overlap", False, "All-reduce during the backward pass (Horovod); convoy: after it.", **_f
)
flags.DEFINE_float("backward_fraction", BACKWARD_FRACTION, "Backward share of compute.", **_f)
flags.DEFINE_float("input_images_per_sec_per_node", None, "A node's input pipeline limit.", **_f)
flags.DEFINE_integer("epoch_images", IMAGENET_TRAIN_IMAGES, "Images per epoch.", **_f)
flags.DEFINE_boolean("json", False, "Print one JSON line.", **_f)
flags.DEFINE_string("plot", None, "Draw efficiency and images/s against GPUs into FILE.png.", **_f)
del _f


def _positive(name: str, value, *, allow_zero: bool = False, what: str = "a positive number"):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise PlanError(f"--{name}={value:g}: expected {what}")
    return value


def _exclusive(*names: str) -> None:
    given = [n for n in names if _FLAGS[n].present]
    if len(given) > 1:
        raise PlanError(f"{' and '.join('--' + n for n in given)}: give only one of them")


def inputs_from_flags(f: flags.FlagValues = _FLAGS) -> tuple[Inputs, list[int], dict | None]:
    """(Inputs, sizes, the run's figures or None) from parsed flags; raises PlanError."""
    _exclusive("per_gpu_images_per_sec", "compute_ms", "from_run")
    _exclusive("params", "model", "from_run")
    _exclusive("per_gpu_batch", "global_batch")
    _exclusive("nodes", "gpus")
    _exclusive("allreduce_gbps", "intra_node_gbps")
    gbps = "a positive number of gigabits per second"
    for name in ("intra_node_gbps", "inter_node_gbps", "allreduce_gbps"):
        _positive(name, f[name].value, what=gbps)
    for name in ("per_gpu_images_per_sec", "compute_ms", "params", "fusion_mb", "epoch_images"):
        _positive(name, f[name].value)
    for name in ("optimizer_ms", "allreduce_alpha_us", "allreduce_base_us", "inter_node_alpha_us"):
        _positive(name, f[name].value, allow_zero=True, what="a number >= 0")
    _positive("intra_node_alpha_us", f.intra_node_alpha_us, allow_zero=True, what="a number >= 0")
    _positive("input_images_per_sec_per_node", f.input_images_per_sec_per_node)
    for name in ("intra_node_efficiency", "inter_node_efficiency", "backward_fraction"):
        if not 0 < f[name].value <= 1:
            raise PlanError(f"--{name}={f[name].value:g}: expected a fraction in (0, 1]")
    if f.grad_bytes_per_param not in (1, 2, 4, 8):
        raise PlanError(
            f"--grad_bytes_per_param={f.grad_bytes_per_param}: expected 4 (fp32), 2 (fp16/bf16), "
            "1 or 8"
        )
    for name in ("per_gpu_batch", "global_batch", "gpus_per_node", "nodes", "num_classes"):
        if f[name].value is not None and f[name].value < 1:
            raise PlanError(f"--{name}={f[name].value}: expected an integer >= 1")
    if f.allreduce_alpha_us is not None and not f.allreduce_gbps:
        raise PlanError("--allreduce_alpha_us needs --allreduce_gbps (the measured bandwidth)")

    node = None
    if f.node is not None:
        node = NODES.get(f.node)
        if node is None:
            raise PlanError(f"--node={f.node}: unknown; expected one of {', '.join(NODES)}")

    run = read_run(f.from_run) if f.from_run else None
    batch_ref = f.per_gpu_batch
    if run:
        batch_ref = batch_ref or int(run["per_replica_batch"])
        ms_per_image = run["time_breakdown.compute_ms"] / run["per_replica_batch"]
        optimizer_ms = run["time_breakdown.optimizer_ms"]
        gradient_bytes = run["gradient_bytes"]
        input_rate = run["time_breakdown.input_images_per_sec"] or None
    else:
        if f.per_gpu_images_per_sec:
            ms_per_image, optimizer_ms = 1000 / f.per_gpu_images_per_sec, 0.0
        elif f.compute_ms:
            if not f.per_gpu_batch:
                raise PlanError("--compute_ms needs --per_gpu_batch: the batch it was timed at")
            ms_per_image, optimizer_ms = f.compute_ms / f.per_gpu_batch, f.optimizer_ms
        else:
            raise PlanError(
                "the one-GPU step is missing: give --per_gpu_images_per_sec, --compute_ms "
                "(with --per_gpu_batch) or --from_run=WORKDIR"
            )
        if f.params:
            params = f.params
        elif f.model:
            if not f.input_shape or f.num_classes is None:
                raise PlanError("--model needs --input_shape=H,W,C and --num_classes=K")
            try:
                shape = tuple(int(d) for d in f.input_shape)
            except ValueError:
                shape = ()
            if len(shape) != 3 or min(shape) < 1:
                raise PlanError(
                    f"--input_shape={','.join(f.input_shape)}: expected H,W,C, three integers >= 1"
                )
            params = count_params(f.model, shape, f.num_classes)
        else:
            raise PlanError("the gradient size is missing: give --params, --model or --from_run")
        gradient_bytes = params * f.grad_bytes_per_param
        input_rate = None
    if f.input_images_per_sec_per_node:
        input_rate = f.input_images_per_sec_per_node
    if batch_ref is None and f.global_batch is None:
        raise PlanError("give --per_gpu_batch (weak scaling) or --global_batch (strong scaling)")

    gpus_per_node = f.gpus_per_node or (node.gpus if node else 8)
    if f.gpus:
        try:
            sizes = [int(n) for n in f.gpus]
        except ValueError:
            raise PlanError(f"--gpus={','.join(f.gpus)}: expected integers, e.g. 1,8,64") from None
    elif f.nodes:
        sizes = sorted({1, gpus_per_node, f.nodes * gpus_per_node})
    else:
        sizes = [1, gpus_per_node]
    inputs = Inputs(
        ms_per_image=ms_per_image,
        gradient_bytes=gradient_bytes,
        per_gpu_batch=None if f.global_batch else batch_ref,
        global_batch=f.global_batch,
        optimizer_ms=optimizer_ms,
        gpus_per_node=gpus_per_node,
        intra_node_gbps=f.intra_node_gbps or (node.intra_node_gbps if node else None),
        inter_node_gbps=f.inter_node_gbps or (node.inter_node_gbps if node else None),
        intra_node_efficiency=f.intra_node_efficiency,
        inter_node_efficiency=f.inter_node_efficiency,
        intra_node_alpha_us=(
            f.intra_node_alpha_us
            if f.intra_node_alpha_us is not None
            else (node.intra_node_alpha_us if node else NCCL_NVLINK_HOP_US)
        ),
        inter_node_alpha_us=f.inter_node_alpha_us,
        allreduce_base_us=f.allreduce_base_us,
        allreduce_gbps=f.allreduce_gbps,
        allreduce_alpha_us=f.allreduce_alpha_us,
        fusion_mb=f.fusion_mb,
        overlap=f.overlap,
        backward_fraction=f.backward_fraction,
        input_images_per_sec_per_node=input_rate,
        epoch_images=f.epoch_images,
    )
    return inputs, sizes, run


def compare_run(inputs: Inputs, run: dict) -> dict:
    """The run's measured step against the model's at its own replica count."""
    n = int(run["num_replicas"])
    batch = int(run["per_replica_batch"])
    row = plan(dataclasses.replace(inputs, per_gpu_batch=batch, global_batch=None), [n])[0]
    measured_rate = 1000 * n * batch / run["time_breakdown.step_ms"]

    def err(predicted, measured):
        return round((predicted - measured) / measured, 4) if measured else None

    return {
        "num_replicas": n,
        "measured": {
            "images_per_sec": round(measured_rate, 2),
            "step_ms": run["time_breakdown.step_ms"],
            "allreduce_ms": run["time_breakdown.allreduce_ms"],
        },
        "predicted": {
            "images_per_sec": round(row.images_per_sec, 2),
            "step_ms": round(row.step_ms, 4),
            "allreduce_ms": round(row.allreduce_ms, 4),
        },
        "error": {
            "images_per_sec": err(row.images_per_sec, measured_rate),
            "allreduce_ms": err(row.allreduce_ms, run["time_breakdown.allreduce_ms"]),
        },
    }


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'gpus':>6} {'nodes':>5} {'batch/gpu':>9} {'images/s':>11} {'effic.':>7} "
        f"{'s/epoch':>9} {'step ms':>9} {'all-reduce ms':>13} {'exposed':>8}  bound / loss"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.gpus:>6} {r.nodes:>5} {r.per_gpu_batch:>9} {r.images_per_sec:>11,.0f} "
            f"{r.efficiency:>7.1%} {r.seconds_per_epoch:>9,.1f} {r.step_ms:>9.2f} "
            f"{r.allreduce_ms:>13.2f} {r.exposed_allreduce_ms:>8.2f}  {r.bound} / {r.loss}"
        )
    return "\n".join(lines)


def draw(rows: Sequence[Row], path: str, title: str) -> None:
    """Efficiency and images/s against GPUs (log x), ideal scaling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [r.gpus for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(gpus, [100 * r.efficiency for r in rows], "o-")
    left.set(xscale="log", xlabel="GPUs", ylabel="scaling efficiency (%)", ylim=(0, 105))
    right.plot(gpus, [r.images_per_sec for r in rows], "o-", label="planned")
    base = rows[0].images_per_sec / rows[0].gpus
    right.plot(gpus, [base * g for g in gpus], "--", color="grey", label="ideal")
    right.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="images/s")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _error(message: str) -> int:
    print(f"error: launch.plan: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str]) -> int:
    if print_help_if_asked(argv, __doc__, _FLAGS):
        return 0
    try:
        stray = _FLAGS(list(argv))[1:]
        if stray:
            raise PlanError(f"unexpected arguments {stray}")
        inputs, sizes, run = inputs_from_flags()
        rows = plan(inputs, sizes)
        comparison = compare_run(inputs, run) if run else None
        plot, as_json = _FLAGS.plot, _FLAGS.json
    except (flags.Error, PlanError) as e:
        return _error(e)
    finally:
        _FLAGS.unparse_flags()  # main may be called again (tests)
    summary = {
        "rows": [r.as_json() for r in rows],
        "inputs": {
            k: (round(v, 6) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(inputs).items()
        },
    }
    if comparison:
        summary["run"] = comparison
    if plot:
        try:
            draw(rows, plot, _title(inputs))
        except OSError as e:
            return _error(f"--plot={plot}: cannot write it ({e.strerror or e})")
        summary["plot"] = plot
    if as_json:
        print(json.dumps(summary))
    else:
        print(_title(inputs))
        print(format_table(rows))
        if comparison:
            print(f"run: {json.dumps(comparison)}")
    return 0


def _title(inputs: Inputs) -> str:
    batch = (
        f"{inputs.per_gpu_batch}/GPU" if inputs.global_batch is None else f"{inputs.global_batch}"
    )
    return (
        f"{1000 / inputs.ms_per_image:,.0f} img/s on one GPU (compute alone), batch {batch}, "
        f"{inputs.gradient_bytes / 1e6:,.1f} MB of gradients, {inputs.gpus_per_node} GPUs/node, "
        f"overlap {'on' if inputs.overlap else 'off'}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
