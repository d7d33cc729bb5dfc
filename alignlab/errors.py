"""alignlab's user-facing errors: `python -m alignlab` prints `error: <message>` and exits 2 for these.

Anything else that escapes a stage is a bug and keeps its full traceback. Each class also derives from the
built-in its callers already catch (`except ValueError`, `except FileNotFoundError`), so raising one of these
in place of the built-in changes no caller. The message must name the field, row or file and say the fix.
"""

from __future__ import annotations

# `python -m alignlab`'s exit status for an AlignlabError (argparse's for a usage error; 1 is a crash, 75 a
# preemption)
EXIT_USER_ERROR = 2


class AlignlabError(Exception):
    """An error the user fixes (a setting, a data file, a missing input), not a bug: reported without traceback."""


class ConfigError(AlignlabError, ValueError):
    """A bad key or value: a choice outside its set, impossible batch arithmetic, settings that contradict."""


class DataError(AlignlabError, ValueError):
    """Bad data: missing columns, empty responses, malformed rows, too few rows for the settings."""


class MissingInputError(AlignlabError, FileNotFoundError):
    """A model, data file or earlier stage's output that is not there (the message names the stage to run)."""
