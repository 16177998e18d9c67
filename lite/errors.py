"""The toolkit's error family: every error raised on purpose is a ``LiteError``, and ``lite`` maps it to an exit code.

    exit 2  bad input: a file, option, checkpoint, model dir or budget that cannot be used as asked
    exit 3  a criterion not met: a validation tolerance or a quality goal (the artifact may still be written)

The message is one line that names the file or option and the fix; the command line prints it without a traceback.
"""
from __future__ import annotations


class LiteError(Exception):
    """Bad input (exit code 2); subclasses name the stage that refused it."""

    exit_code = 2


class CriterionNotMet(LiteError):
    """A measured result misses what was asked of it (exit code 3)."""

    exit_code = 3
