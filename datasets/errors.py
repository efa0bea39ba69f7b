"""The one exception type for bad dataset input or output.

Every problem with a file the user handed us (missing, truncated, wrong format, inconsistent) is
raised as `DataError` with a single line that names the file (and row or index when there is one)
and says what was expected, so the CLI can print it as-is and the user knows what to fix.
"""


class DataError(Exception):
    """Bad input or output data; the message is one line naming the file and what was expected."""

    def __init__(self, message: str):
        # Callers format messages from file contents; a stray newline would break the one-line rule.
        super().__init__(" ".join(str(message).split()))


class OutputExistsError(DataError):
    """The output directory holds a different dataset and overwriting was not asked for."""
