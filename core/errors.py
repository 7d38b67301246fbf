"""Error types of DISA, and the exit codes the commands map them to.

Every exception class DISA defines derives from `DisaError` (tests/core/test_errors.py
checks all packages), so a caller that embeds DISA can tell DISA's errors from
everything else with one `except`. Each class keeps the built-in base it had
(ValueError, RuntimeError, LookupError ...), so existing handlers still match.

`InputError` is the one error a user can act on: a file that cannot be read, a
header that breaks a limit, an option out of range. The CLI maps it to exit
code 2 and prints its message on one line; the service maps it to HTTP 4xx or a
failed job whose message is this text. Every other exception is an internal
error (exit code 1).

`PatientMismatch` is the InputError of two series of different patients.

The exit codes live here, beside the error that decides between them, because
every command needs them: `disa register` (disa/cli.py), `disa pacs`
(disa/pacs/cli.py) and `disa submit` (service/cli.py, through
service/engine_surface.py). They are a contract with users' scripts (README,
"Exit codes").
"""

#: The command did what was asked.
EXIT_OK = 0
#: Not the input's fault: a bug, a lost worker, a service or PACS out of reach.
EXIT_INTERNAL = 1
#: The input or the options are at fault (InputError, a refused job, bad arguments).
EXIT_INPUT = 2


class DisaError(Exception):
    """The base of every exception class that DISA defines."""


class InputError(DisaError, ValueError):
    """Bad input named in words a user can act on (file, header, option)."""


class PatientMismatch(InputError):
    """Fixed and moving series belong to different patients.

    The message names both PatientIDs (for the operator who typed the UIDs);
    `reason` says the same without them, for places that must stay free of
    identifiers (result.json, service responses and logs).

    One class for the engine (`dicom_reg.check_same_patient`, which writes no DICOM
    objects for such a pair) and `disa pacs` (which submits nothing): both import it
    from here, so a caller catches one type whichever layer raised it. An InputError,
    because the inputs are at fault (exit code 2).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CancelledError(DisaError, RuntimeError):
    """The caller asked to stop (cooperative cancel between optimiser iterations)."""
