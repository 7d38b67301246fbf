"""Error types of the registration engine.

`InputError` is the one error a user can act on: a file that cannot be read, a
header that breaks a limit, an option out of range. The CLI maps it to exit
code 2 and prints its message on one line; the service maps it to HTTP 4xx or a
failed job whose message is this text. Every other exception is an internal
error (exit code 1).
"""


class InputError(ValueError):
    """Bad input named in words a user can act on (file, header, option)."""


class CancelledError(RuntimeError):
    """The caller asked to stop (cooperative cancel between optimiser iterations)."""
