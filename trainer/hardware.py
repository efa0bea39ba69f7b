"""What this machine is, and the numerics it runs fast: CPU, ISA flags, GPUs, TensorFlow.

`read_machine()` reads the facts once (the CPU model and ISA flags from /proc/cpuinfo, the core
count, the visible GPUs' names and compute capabilities from TensorFlow, the library versions);
it never raises. Everything else here is a pure function of those facts:
`resolve_precision(requested, cpu_flags, gpu_capabilities)` decides what `--precision=auto`
means on them and warns when an explicit choice is emulated, so it is tested over a table of
machines. The trainer passes the facts to the plan and records `Machine.as_json()` in
summary.json; every benchmark prints the same object next to its figures.

Why these rules (issue 9): oneDNN runs bf16 natively only with AVX512_BF16 or AMX-BF16; without
them bf16 is emulated, and was measured ~7x slower than fp32 (fp16 on a CPU without AVX512_FP16:
~10x slower; auto never picks fp16 on a CPU). GPUs have bf16 tensor cores from compute
capability 8.0 (Ampere) and fp16 tensor cores from 7.0 (Volta), where fp16 needs dynamic loss
scaling.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Iterable, Sequence

CPUINFO = "/proc/cpuinfo"
# The ISA flags that decide which numerics run fast (the `flags` line of /proc/cpuinfo).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FP16_FLAGS = ("avx512_fp16",)
BF16_GPU = (8, 0)  # Ampere: bf16 tensor cores
FP16_GPU = (7, 0)  # Volta: fp16 tensor cores

# The measurements behind the emulated-precision warnings, with the machines they came from.
EMULATED_BF16_FIGURE = (
    "measured ~7x slower than fp32 (332 vs 2,294 img/s, tutorial_cnn, batch 128, on a 2-core "
    "AMD EPYC with AVX2 only)"
)
EMULATED_FP16_FIGURE = (
    "measured ~10x slower than fp32 (369-396 vs 3,470-4,692 img/s, tutorial_cnn, batch 128, "
    "synthetic data, on a 2-core AMD EPYC with AVX512_BF16 but no AVX512_FP16, shared with "
    "other jobs)"
)


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None  # None: TensorFlow did not report one (e.g. ROCm)


@dataclasses.dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_count: int  # logical CPUs this process may run on
    # The ISA_FLAGS this CPU has; None when /proc/cpuinfo could not be read (cpu_flags_error says
    # why), which is not the same as "none of them".
    cpu_flags: tuple[str, ...] | None
    cpu_flags_error: str
    gpus: tuple[Gpu, ...]  # the GPUs visible to this process (after the backend chose them)
    tensorflow: str
    keras: str

    @property
    def gpu_capabilities(self) -> tuple[tuple[int, int] | None, ...]:
        return tuple(g.compute_capability for g in self.gpus)

    def as_json(self) -> dict:
        """The `machine` object of summary.json and of every benchmark's JSON line."""
        known = self.cpu_flags is not None
        found = {
            "cpu_model": self.cpu_model,
            "cpu_count": self.cpu_count,
            # null: unknown (cpuinfo unreadable), not absent.
            "isa": {f: (f in self.cpu_flags) if known else None for f in ISA_FLAGS},
            "gpus": [
                {
                    "name": g.name,
                    "compute_capability": (
                        _capability(g.compute_capability) if g.compute_capability else None
                    ),
                }
                for g in self.gpus
            ],
            "tensorflow": self.tensorflow,
            "keras": self.keras,
        }
        if not known:
            found["cpuinfo_error"] = self.cpu_flags_error
        return found

    def describe(self) -> str:
        """One log line."""
        if self.cpu_flags is None:
            isa = f"ISA unknown ({self.cpu_flags_error})"
        else:
            isa = " ".join(self.cpu_flags) or f"none of {', '.join(ISA_FLAGS)}"
        gpus = ", ".join(
            f"{g.name} (compute capability {_capability(g.compute_capability)})" for g in self.gpus
        )
        return (
            f"machine: {self.cpu_model}, {self.cpu_count} CPUs, {isa}; "
            f"{gpus or 'no GPU'}; TensorFlow {self.tensorflow}, Keras {self.keras}"
        )


def _capability(capability: tuple[int, int] | None) -> str:
    return ".".join(map(str, capability)) if capability else "unknown"


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, the ISA_FLAGS present) from the text of /proc/cpuinfo. Pure."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:  # x86 `flags`, Arm `Features`
            flags = set(value.split())
    return model, tuple(f for f in ISA_FLAGS if f in (flags or ()))


def read_cpu(path: str = CPUINFO) -> tuple[str, tuple[str, ...] | None, str]:
    """(CPU model, ISA flags or None, why None). Never raises."""
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError as e:
        return fallback, None, f"cannot read {path}: {e.strerror or e}"
    return model or fallback, flags, ""


def read_gpus() -> tuple[Gpu, ...]:
    """The GPUs visible to TensorFlow in this process, with compute capabilities. Never raises."""
    try:
        import tensorflow as tf

        devices = tf.config.get_visible_devices("GPU")
    except Exception:  # noqa: BLE001 - no TensorFlow or no GPU runtime: no GPU to report
        return ()
    gpus = []
    for device in devices:
        try:
            details = tf.config.experimental.get_device_details(device)
        except Exception:  # noqa: BLE001 - a device TensorFlow cannot describe
            details = {}
        capability = details.get("compute_capability")
        gpus.append(
            Gpu(
                name=str(details.get("device_name") or device.name),
                compute_capability=tuple(int(x) for x in capability) if capability else None,
            )
        )
    return tuple(gpus)


def _version(module: str, *distributions: str) -> str:
    """The module's version, without importing it when it is not loaded yet (TensorFlow's import
    takes seconds); `distributions` are the package names it may be installed under."""
    loaded = sys.modules.get(module)
    if loaded is not None and hasattr(loaded, "__version__"):
        return str(loaded.__version__)
    from importlib import metadata

    for name in distributions or (module,):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_machine(cpuinfo: str | None = None, *, gpus: bool = True) -> Machine:
    """This machine's facts (GPUs only when `gpus`: reading them starts TensorFlow's GPU runtime).

    In a training run, call it after the backend has chosen the visible GPUs. `cpuinfo` defaults
    to $CONVOY_CPUINFO, else /proc/cpuinfo: the variable lets a test give two processes of one
    run different CPUs (what a mixed node pool does).
    """
    cpuinfo = cpuinfo or os.environ.get("CONVOY_CPUINFO") or CPUINFO
    model, flags, error = read_cpu(cpuinfo)
    return Machine(
        cpu_model=model,
        cpu_count=cpu_count(),
        cpu_flags=flags,
        cpu_flags_error=error,
        gpus=read_gpus() if gpus else (),
        tensorflow=_version(
            "tensorflow", "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos"
        ),
        keras=_version("keras"),
    )


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | fp16 | bf16, never auto
    reason: str  # why, one line
    warning: str = ""  # one line when the choice is known to be slow here; else empty
    decided_by: str = "this process"  # which process's machine decided (trainer/run_precision.py)


def resolve_precision(
    requested: str,
    cpu_flags: Iterable[str] | None,
    gpu_capabilities: Sequence[tuple[int, int] | None] = (),
) -> PrecisionChoice:
    """What `--precision=requested` runs as on a machine with these facts. Pure; never raises.

    `cpu_flags`: the CPU's ISA flags (None: unknown). `gpu_capabilities`: the compute capability
    of each GPU the run trains on (None for one that reports none); empty for a CPU run. With
    several GPUs the weakest decides, since every replica runs the same numerics.
    """
    if gpu_capabilities:
        return _on_gpus(requested, tuple(gpu_capabilities))
    return _on_cpu(requested, None if cpu_flags is None else frozenset(cpu_flags))


def _on_gpus(requested: str, capabilities) -> PrecisionChoice:
    if None in capabilities:
        weakest = None
        where = "a GPU that reports no compute capability"
    else:
        weakest = min(capabilities)
        where = f"GPU compute capability {_capability(weakest)}"
        if len(set(capabilities)) > 1:
            where += " (the weakest of the run's GPUs)"
    if requested != "auto":
        warning = ""
        if requested == "bf16" and (weakest is None or weakest < BF16_GPU):
            has = "may lack" if weakest is None else "lacks"
            warning = (
                f"--precision=bf16 on {where}, which {has} bf16 tensor cores (compute "
                "capability 8.0 and newer): bf16 runs without them, slower (not measured here); "
                f"--precision=auto would choose {_auto_on_gpu(weakest)}"
            )
        return PrecisionChoice(requested, f"--precision={requested} on {where}", warning)
    precision = _auto_on_gpu(weakest)
    why = {
        "bf16": "bf16 tensor cores (>= 8.0)",
        "fp16": "fp16 tensor cores but no bf16 (7.x); dynamic loss scaling",
        "fp32": "no fp16/bf16 tensor cores (< 7.0)" if weakest else "its tensor cores unknown",
    }[precision]
    return PrecisionChoice(precision, f"auto on {where}: {why}")


def _auto_on_gpu(weakest: tuple[int, int] | None) -> str:
    if weakest is None:
        return "fp32"
    if weakest >= BF16_GPU:
        return "bf16"
    return "fp16" if weakest >= FP16_GPU else "fp32"


def _on_cpu(requested: str, flags: frozenset[str] | None) -> PrecisionChoice:
    native = sorted(flags & set(NATIVE_BF16_FLAGS)) if flags is not None else []
    if flags is None:
        has = "a CPU whose ISA flags could not be read, so bf16 may be emulated"
    elif native:
        has = f"a CPU with {' and '.join(native)}, which runs bf16 natively"
    else:
        has = f"a CPU without {' or '.join(NATIVE_BF16_FLAGS)}, where bf16 would be emulated"
    if requested == "auto":
        return PrecisionChoice("bf16" if native else "fp32", f"auto on {has}")
    warning = ""
    if requested == "fp16" and (flags is None or not flags & set(NATIVE_FP16_FLAGS)):
        warning = (
            f"--precision=fp16 on a CPU without {' or '.join(NATIVE_FP16_FLAGS)}: fp16 is "
            f"emulated, {EMULATED_FP16_FIGURE}; --precision=auto never picks fp16 on a CPU"
        )
    if requested == "bf16" and not native:
        if flags is None:
            warning = (
                "--precision=bf16: cannot tell whether this CPU runs bf16 natively; without "
                f"{' or '.join(NATIVE_BF16_FLAGS)} it is emulated, {EMULATED_BF16_FIGURE}"
            )
        else:
            warning = (
                f"--precision=bf16 on a CPU without {' or '.join(NATIVE_BF16_FLAGS)}: bf16 is "
                f"emulated, {EMULATED_BF16_FIGURE}; --precision=auto chooses fp32 here"
            )
    return PrecisionChoice(requested, f"--precision={requested} on {has}", warning)
