"""trainer.hardware: reading the machine, and the precision rules as a pure function of it."""

from __future__ import annotations

import json
import os

import pytest

from trainer import hardware
from trainer.hardware import resolve_precision

AVX2 = ("avx2",)  # e.g. the 2-core AMD EPYC (Zen 3) of issue 9
AVX512 = ("avx2", "avx512f")  # AVX-512 without its bf16 extension (e.g. Skylake-SP)
AVX512_BF16 = ("avx2", "avx512f", "avx512_bf16")  # e.g. Zen 4, Cooper Lake
AMX = ("avx2", "avx512f", "amx_bf16")  # Sapphire Rapids (also has avx512_bf16; AMX alone counts)
UNKNOWN = None  # /proc/cpuinfo unreadable


@pytest.mark.parametrize(
    "requested, cpu_flags, gpus, expected",
    [
        # CPUs: bf16 only where oneDNN runs it natively.
        ("auto", AVX2, (), "fp32"),
        ("auto", AVX512, (), "fp32"),
        ("auto", AVX512_BF16, (), "bf16"),
        ("auto", AMX, (), "bf16"),
        ("auto", (), (), "fp32"),
        ("auto", UNKNOWN, (), "fp32"),
        # GPUs: the weakest GPU of the run decides; the CPU's flags do not matter then.
        ("auto", AVX2, ((9, 0),), "bf16"),
        ("auto", AVX2, ((8, 0),), "bf16"),
        ("auto", AVX512_BF16, ((7, 5),), "fp16"),
        ("auto", AVX2, ((7, 0),), "fp16"),
        ("auto", AVX512_BF16, ((6, 1),), "fp32"),
        ("auto", AVX2, ((8, 6), (7, 0)), "fp16"),
        ("auto", AVX2, ((8, 0), None), "fp32"),  # a GPU without a compute capability
        # An explicit choice is always honoured.
        ("fp32", AVX512_BF16, (), "fp32"),
        ("bf16", AVX2, (), "bf16"),
        ("fp16", AVX2, (), "fp16"),
        ("bf16", AVX2, ((7, 0),), "bf16"),
        ("fp32", AVX2, ((8, 0),), "fp32"),
    ],
)
def test_precision_rules(requested, cpu_flags, gpus, expected):
    choice = resolve_precision(requested, cpu_flags, gpus)
    assert choice.precision == expected
    assert choice.reason and "\n" not in choice.reason
    if requested == "auto":
        assert choice.reason.startswith("auto on ")
    else:
        assert choice.reason.startswith(f"--precision={requested}")


@pytest.mark.parametrize(
    "requested, cpu_flags, gpus, words",
    [
        ("bf16", AVX2, (), ["emulated", "332 vs 2,294 img/s", "AVX2 only", "auto chooses fp32"]),
        ("bf16", AVX512, (), ["emulated", "~7x slower"]),
        ("bf16", UNKNOWN, (), ["cannot tell", "~7x slower"]),
        ("bf16", AVX2, ((7, 5),), ["compute capability 7.5", "auto would choose fp16"]),
        ("bf16", AVX2, ((6, 0),), ["auto would choose fp32"]),
        ("fp16", AVX512_BF16, (), ["emulated", "~10x slower", "never picks fp16 on a CPU"]),
        ("fp16", UNKNOWN, (), ["emulated"]),
    ],
)
def test_explicit_choice_where_it_is_emulated_warns_in_one_line(requested, cpu_flags, gpus, words):
    choice = resolve_precision(requested, cpu_flags, gpus)
    assert choice.precision == requested
    assert "\n" not in choice.warning
    for word in words:
        assert word in choice.warning, choice.warning


@pytest.mark.parametrize(
    "requested, cpu_flags, gpus",
    [
        ("bf16", AVX512_BF16, ()),
        ("bf16", AMX, ()),
        ("bf16", AVX2, ((8, 0),)),
        ("fp32", AVX2, ()),
        ("auto", AVX2, ()),
        ("auto", UNKNOWN, ()),
        ("fp16", AVX2, ((7, 0),)),
        ("fp16", ("avx2", "avx512f", "avx512_fp16"), ()),
    ],
)
def test_no_warning_where_the_choice_runs_natively_or_is_auto(requested, cpu_flags, gpus):
    assert resolve_precision(requested, cpu_flags, gpus).warning == ""


def test_reasons_name_what_decided():
    assert "avx512_bf16" in resolve_precision("auto", AVX512_BF16).reason
    assert "amx_bf16" in resolve_precision("auto", AMX).reason
    assert "could not be read" in resolve_precision("auto", UNKNOWN).reason
    assert "compute capability 7.0 (the weakest" in (
        resolve_precision("auto", AVX2, [(8, 6), (7, 0)]).reason
    )


X86_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2 avx512f avx512dq avx512_bf16 avx512_vnni
bogomips\t: 4899.99

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2 avx512f avx512dq avx512_bf16 avx512_vnni
"""
ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    "text, model, flags",
    [
        (X86_CPUINFO, "AMD EPYC 7B13", ("avx2", "avx512f", "avx512_bf16")),
        (
            "model name : Intel Xeon\nflags : sse avx2 amx_bf16 amx_tile\n",
            "Intel Xeon",
            ("avx2", "amx_bf16"),
        ),
        (ARM_CPUINFO, "", ()),  # Arm's bf16 is not one of the x86 flags the rules know
        ("", "", ()),
    ],
)
def test_parse_cpuinfo(text, model, flags):
    assert hardware.parse_cpuinfo(text) == (model, flags)


def test_read_machine_from_a_cpuinfo_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_CPUINFO)
    machine = hardware.read_machine(str(path), gpus=False)
    assert machine.cpu_model == "AMD EPYC 7B13"
    assert machine.cpu_flags == ("avx2", "avx512f", "avx512_bf16")
    assert machine.cpu_count >= 1 and machine.gpus == ()
    found = machine.as_json()
    assert found["isa"] == {
        "avx2": True,
        "avx512f": True,
        "avx512_bf16": True,
        "amx_bf16": False,
        "avx512_fp16": False,
    }
    assert found["gpus"] == [] and "cpuinfo_error" not in found
    json.dumps(found)  # the benchmarks print it as it is
    assert "AMD EPYC 7B13, " in machine.describe() and "no GPU" in machine.describe()


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
def test_unreadable_cpuinfo_gives_fp32_with_a_reason(tmp_path, kind):
    path = tmp_path / "cpuinfo"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.write_text(X86_CPUINFO)
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: a path under a file cannot be opened
            path = path / "cpuinfo"
    machine = hardware.read_machine(str(path), gpus=False)
    assert machine.cpu_flags is None and str(tmp_path) in machine.cpu_flags_error
    assert machine.cpu_model  # falls back to what the platform module says
    assert machine.as_json()["isa"] == dict.fromkeys(hardware.ISA_FLAGS)
    assert machine.as_json()["cpuinfo_error"] == machine.cpu_flags_error
    choice = resolve_precision("auto", machine.cpu_flags, machine.gpu_capabilities)
    assert choice.precision == "fp32" and "could not be read" in choice.reason


def test_gpus_in_the_machine_object():
    machine = hardware.Machine(
        "cpu",
        8,
        AVX2,
        "",
        (hardware.Gpu("NVIDIA A100-SXM4-40GB", (8, 0)), hardware.Gpu("AMD MI250", None)),
        "2.21.0",
        "3.15.1",
    )
    assert machine.as_json()["gpus"] == [
        {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"},
        {"name": "AMD MI250", "compute_capability": None},
    ]
    assert machine.gpu_capabilities == ((8, 0), None)
    assert "NVIDIA A100-SXM4-40GB (compute capability 8.0)" in machine.describe()


def test_this_machine_is_read_without_error():
    machine = hardware.read_machine()
    assert machine.cpu_count >= 1 and machine.tensorflow != "not installed"
    if os.path.exists(hardware.CPUINFO):
        assert machine.cpu_flags is not None
