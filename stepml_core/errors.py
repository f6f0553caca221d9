"""One family for the errors StepML raises on purpose (bad input, bad usage).

Every such error derives from :class:`StepMLError`; its message is one line that names the file
(or folder, or option) and the problem. Library code raises them and never exits; only the command
line's ``main()`` maps them to exit codes and prints the message (tracebacks with ``--verbose`` only).
Subclasses keep the built-in base they had before (``ValueError``, ``KeyError``) so callers that
catch those still work.
"""

from __future__ import annotations


class StepMLError(Exception):
    """Base of StepML's own errors: a one-line, user-facing message naming file (or option) and problem."""


class UsageError(StepMLError):
    """A command was asked for something it cannot do (no run folders, unknown ids, bad option mix);
    raised before anything is written."""


class NoUsableRunsError(StepMLError):
    """Every run of a study failed or was refused: there is nothing to fit a study on."""
