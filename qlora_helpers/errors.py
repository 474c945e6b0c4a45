"""User-facing errors: one paragraph that says what was wrong and what to do.

Expected mistakes (a bad config key, a missing file, a GGUF transformers cannot read) raise
`QLoraError`. In a notebook, `show_errors_briefly()` makes IPython print such an error as that
paragraph instead of a traceback wall; unexpected errors keep their full traceback.
"""

from __future__ import annotations


class QLoraError(Exception):
    """An expected mistake with a message that tells the user what to do."""


class ConfigError(QLoraError, ValueError):
    """The configuration (YAML profile or an override) is invalid; `key` is the setting at fault
    (`lora.r`, `data.sources[0].weight`), so the error can name where its value came from."""

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


class UsageError(QLoraError):
    """A command-line option is wrong, found after argparse: the CLI exits with 2, as argparse does."""


class ModelSourceError(QLoraError):
    """A model source cannot be resolved or loaded."""


class DataError(QLoraError, ValueError):
    """Training or evaluation data is missing or malformed."""


def _brief_traceback(shell, etype, value, tb, tb_offset=None):
    # IPython's run_code calls this handler and discards its return value, so the handler itself
    # sends the (one-line) error to the frontend; papermill and nbclient see a normal error output.
    stb = [f"{etype.__name__}: {value}"]
    shell._showtraceback(etype, value, stb)
    return stb


def show_errors_briefly() -> None:
    """In IPython/Jupyter, print a QLoraError as its message alone (no traceback)."""
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: nothing to configure
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((QLoraError,), _brief_traceback)
