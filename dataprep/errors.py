"""Errors that stop a dataprep run with a clear one-line message (no traceback)."""


class DataprepError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with status 2."""


class InputError(DataprepError):
    """Bad input; the message names the file (and line) and the reason."""


class ToolError(DataprepError):
    """A missing or failing external tool (MMseqs2); the message says how to install or what failed."""
