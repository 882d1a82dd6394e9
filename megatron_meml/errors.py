"""Errors a user can cause and fix: a bad recipe or override, a bad data row, a missing or wrong file or
checkpoint. Each message names the file, row or key and says what to do; ``meml`` prints it as one line and exits
with status 2. Everything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Base of every user-fixable error."""


class ConfigError(UserError):
    """A recipe or override error; the message names the file and key."""


class DataError(UserError):
    """A bad dataset or traces file; the message names the file and row."""


class RunError(UserError):
    """A problem with a run's inputs (model directory, tokenizer, run directory)."""


class CheckpointError(UserError):
    """A missing, incomplete or incompatible checkpoint."""


class ExportError(UserError):
    """``meml export`` cannot export what it was pointed at."""


class PlanError(UserError):
    """A layout ``meml plan`` cannot place on the cluster it was given."""


class TracesError(RunError):
    """``meml traces`` cannot continue: a teacher, a trace directory or a resumed store that does not fit."""
