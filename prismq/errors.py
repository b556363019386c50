"""The one exception type users see: a clear, one-line message and nothing half-written."""


class PrismqError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
