"""Errors meant for users: one clear line, exit code 2, no traceback.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from a user (config, data, checkpoint, CLI). The message is the whole story."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that cannot be used."""


class DataError(UserError):
    """A data source that is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or does not match the run."""


class ResourceError(UserError):
    """The machine lacks what the run needs: disk space, a writable directory, memory."""
