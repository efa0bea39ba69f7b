"""The trainer's command line: absl flags derived from `Config`'s fields, presets, and `--help`.

Importing this module defines one flag per Config field (same name, default and help; choices
become enums; tuples become comma-separated lists). Only `config_from_argv` reads their values,
once, into a `Config` (checked by `trainer.config.validated`); no other module touches FLAGS.
Importing it is the command line's business: a library user or a benchmark may define flags of
the same names, so `trainer.config` never imports this module.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from trainer import config as config_lib

FLAGS = flags.FLAGS
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _define(field: dataclasses.Field, field_type) -> None:
    name, default, help_text = field.name, field.default, field.metadata["help"]
    allowed = field.metadata.get("choices")
    if config_lib.list_converter(field_type):
        flags.DEFINE_list(name, [str(v) for v in (default or ())], help_text)
    elif allowed:
        flags.DEFINE_enum(name, default, list(allowed), help_text)
    elif field_type is bool:
        flags.DEFINE_boolean(name, default, help_text)
    elif field_type is int:
        flags.DEFINE_integer(name, default, help_text)
    elif field_type is float:
        flags.DEFINE_float(name, default, help_text)
    elif field_type is str:
        flags.DEFINE_string(name, default, help_text)
    else:
        raise TypeError(f"Config.{name}: no flag kind for {field_type}")


for _field, _type in config_lib.fields():
    _define(_field, _type)


def config_from_argv(argv: list[str], *, check_paths: bool = True) -> config_lib.Config:
    """Parses a full command line (argv[0] is the program) into a Config; raises ConfigError."""
    FLAGS.unparse_flags()  # A second parse in one process must not inherit the first one's values.
    try:
        leftover = FLAGS(expand_presets(argv))
    except flags.Error as e:
        raise config_lib.ConfigError(_one_line(str(e))) from None
    if len(leftover) > 1:
        raise config_lib.ConfigError(
            f"unexpected positional arguments {leftover[1:]}; every option is a --flag"
        )
    return config_from_flags(FLAGS, check_paths=check_paths)


def config_from_flags(values, *, check_paths: bool = True) -> config_lib.Config:
    """Builds and checks a Config from parsed absl flag values; raises ConfigError."""
    settings = {}
    for field, field_type in config_lib.fields():
        value = getattr(values, field.name)
        convert = config_lib.list_converter(field_type)
        settings[field.name] = convert(field.name, value) if convert else value
    return config_lib.validated(config_lib.Config(**settings), check_paths=check_paths)


def _one_line(message: str) -> str:
    # absl prefixes some messages with its own "ERROR::"; ours already starts with "error:".
    return " ".join(message.replace("ERROR::", "").split())


def presets() -> list[str]:
    """Names of the presets shipped in trainer/configs (`--preset=NAME`)."""
    return sorted(f[: -len(".cfg")] for f in os.listdir(PRESET_DIR) if f.endswith(".cfg"))


def expand_presets(argv: list[str]) -> list[str]:
    """`--preset=NAME` -> `--flagfile=<package>/configs/NAME.cfg`, in place, so later flags win."""
    expanded = []
    for arg in argv:
        if arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
            if name not in presets():
                raise config_lib.ConfigError(
                    f"--preset={name}: unknown; expected one of {', '.join(presets())}"
                )
            arg = f"--flagfile={os.path.join(PRESET_DIR, name + '.cfg')}"
        expanded.append(arg)
    return expanded


def help_text(program: str = "python -m trainer") -> str:
    """--help: the trainer's own flags, grouped as Config declares them, then the presets."""
    lines = [
        f"usage: {program} [--preset=NAME] [--flagfile=FILE] [--FLAG=VALUE ...]",
        "",
        "Trains and evaluates a CNN; see README.md. --helpfull also lists absl's own flags.",
    ]
    for field, _ in config_lib.fields():
        if field.name in config_lib.GROUPS:
            lines += ["", f"{config_lib.GROUPS[field.name]}:"]
        flag = FLAGS[field.name]
        default = flag.default_as_str or "''"
        lines.append(f"  --{field.name}  (default: {default})")
        lines.append(f"      {flag.help}")
    lines += ["", "Presets (--preset=NAME, from trainer/configs/NAME.cfg):"]
    lines += [f"  {name}" for name in presets()]
    return "\n".join(lines)
