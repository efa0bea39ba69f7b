"""Every command-line flag of the trainer, defined in one place.

Only `trainer.config` reads these values (once, into a `Config`); no other module touches FLAGS.
"""

from absl import flags

MODELS = (
    "softmax",
    "lenet",
    "tutorial_cnn",
    "small_convnet",
    "sign_cnn",
    "cats_dogs_cnn",
    "resnet50",
)
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "horovod")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "one_cycle")
PRECISIONS = ("fp32", "fp16", "bf16")

# Data.
flags.DEFINE_string(
    "data_dir",
    "",
    "Prepared dataset directory (with metadata.json, written by "
    "`python -m datasets.prepare`). Empty: the embedded MNIST sample.",
)
flags.DEFINE_string("train_split", "train", "Split to train on.")
flags.DEFINE_string(
    "eval_split",
    "",
    "Split to evaluate on. Empty: `test` if the dataset has it, else `validation`.",
)
flags.DEFINE_list(
    "image_size", [], "Model input HEIGHT,WIDTH. Empty: the model's own size, else the dataset's."
)
flags.DEFINE_integer("shuffle_buffer", 10_000, "Examples in the training shuffle buffer.")
flags.DEFINE_boolean("random_flip", False, "Augment: random horizontal flips.")
flags.DEFINE_float("random_shift", 0.0, "Augment: random shift, as a fraction of the image size.")
flags.DEFINE_float("random_rotation", 0.0, "Augment: random rotation, maximum degrees.")
flags.DEFINE_float("random_zoom", 0.0, "Augment: random zoom, maximum fraction.")
flags.DEFINE_boolean(
    "synthetic_data", False, "Feed random tensors of the dataset's shape (measures compute alone)."
)

# Where the run writes.
flags.DEFINE_string(
    "workdir",
    "",
    "Directory for checkpoints, TensorBoard events, exports and "
    "summary.json. Empty: runs/<model>-<time>.",
)
flags.DEFINE_string(
    "init_checkpoint",
    "",
    "Checkpoint (file prefix or directory) to start from when the workdir has none.",
)

# Model and precision.
flags.DEFINE_enum("model", "tutorial_cnn", MODELS, "Model architecture.")
flags.DEFINE_enum(
    "precision", "fp32", PRECISIONS, "fp32; fp16 (mixed, dynamic loss scaling); bf16 (mixed)."
)
flags.DEFINE_enum(
    "xla",
    "auto",
    ("auto", "on", "off"),
    "XLA-compile the per-replica step. auto: on for GPUs, off for CPUs (XLA is slower on CPU).",
)

# Distribution.
flags.DEFINE_enum(
    "strategy",
    "auto",
    STRATEGIES,
    "Distribution backend. auto: horovod under "
    "horovodrun/mpirun, multi_worker when TF_CONFIG names several tasks, mirrored "
    "with several GPUs, else one_device.",
)
flags.DEFINE_list("gpus", [], "GPU indices to use (default: all visible).")
flags.DEFINE_integer(
    "num_cpu_devices",
    1,
    "Split the CPU into this many logical devices (tests the mirrored logic on CPU-only machines).",
)
flags.DEFINE_boolean(
    "fp16_allreduce", False, "Horovod: compress gradients to fp16 for the all-reduce."
)
flags.DEFINE_float(
    "stall_timeout_s",
    0.0,
    "Exit non-zero, dumping stacks, when no training progress is made for this long (0: off).",
)

# Optimisation.
flags.DEFINE_integer("global_batch_size", 64, "Examples per step summed over all replicas.")
flags.DEFINE_integer("train_steps", 0, "Training steps (0: use --epochs).")
flags.DEFINE_float("epochs", 15.0, "Epochs over the training split, when --train_steps is 0.")
flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (before --scale_lr).")
flags.DEFINE_float("momentum", 0.9, "Momentum for `momentum` and `rmsprop`.")
flags.DEFINE_enum("lr_schedule", "cosine", SCHEDULES, "Learning-rate schedule after warmup.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps.")
flags.DEFINE_list(
    "lr_step_boundaries",
    [],
    "step schedule: fractions of training (e.g. 0.5,0.75) "
    "where the rate is multiplied by --lr_step_factor.",
)
flags.DEFINE_float("lr_step_factor", 0.1, "step schedule: multiplier at each boundary.")
flags.DEFINE_boolean(
    "scale_lr", False, "Linear scaling rule: learning_rate * global_batch / --base_batch_size."
)
flags.DEFINE_integer("base_batch_size", 128, "Batch size the learning rate was tuned for.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing.")
flags.DEFINE_float("clip_grad_norm", 0.0, "Clip gradients to this global norm (0: off).")

# Loop, checkpoints, logging.
flags.DEFINE_integer("steps_per_loop", 50, "Steps run inside one compiled function call.")
flags.DEFINE_integer("eval_every_steps", 0, "Evaluate every N steps (0: only at the end).")
flags.DEFINE_integer(
    "checkpoint_every_steps",
    500,
    "Save a checkpoint every N steps (0: only at the end and on SIGTERM).",
)
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("log_every_steps", 100, "Console and TensorBoard scalars every N steps.")
flags.DEFINE_integer("histogram_every_steps", 0, "Weight histograms every N steps (0: off).")
flags.DEFINE_list("profile_steps", [], "A,B: write a profiler trace for steps A..B.")
flags.DEFINE_boolean("export", True, "Export a SavedModel and a .keras file at the end.")
flags.DEFINE_integer("seed", 0, "Random seed (data order, initialisation, dropout).")
flags.DEFINE_boolean("deterministic", False, "Seed everything and enable TF op determinism.")
