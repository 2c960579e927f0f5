"""Error types of the data layer.

Kept apart so that every data module (and the trainer, which catches them to print a
one-line message instead of a traceback) can import them without importing the rest.
"""


class DataError(ValueError):
    """The data a user pointed at is missing, empty or malformed.

    The message always names the offending path (and line, for JSONL) and says what to
    change, because these errors surface at the start of long jobs launched from configs.
    """


class DataFetchError(RuntimeError):
    """Fetching a named corpus from a package registry failed.

    The message names the step that failed (pip, apt, archive layout) and includes the
    tool's last stderr lines, so a user on a machine without network access can tell that
    apart from a broken archive.
    """
