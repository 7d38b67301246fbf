"""Bounded exponential back-off for PACS calls, and the errors of the PACS package."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from disa.core.errors import DisaError

log = logging.getLogger("disa.pacs")
T = TypeVar("T")


class PacsError(DisaError, RuntimeError):
    """A PACS operation failed; the message is one line meant for the user."""


class PacsUnavailable(PacsError):
    """The PACS (or the service) did not answer after all retries."""


class SeriesNotFound(PacsError):
    """The PACS does not hold the series asked for (a bad argument, not an outage)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    `attempts` counts all tries (1 = no retry). The wait before retry k
    (k = 1, 2, ...) is min(max_delay_s, base_delay_s * 2**(k-1)) scaled by a
    random factor in [0.5, 1] so that many clients do not retry in step.
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry policy needs attempts >= 1 and non-negative delays")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between the attempts, in seconds (attempts - 1 of them)."""
        rng = rng or random.Random()
        for k in range(self.attempts - 1):
            yield min(self.max_delay_s, self.base_delay_s * 2**k) * rng.uniform(0.5, 1.0)


def call_with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    transient: Callable[[BaseException], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`, retrying failures that `transient` accepts, as `policy` allows.

    Any other exception passes through at once. When the attempts run out, a
    PacsUnavailable names `what` and the last failure's kind (never its full
    text, which may quote a URL with identifiers).
    """
    delays = policy.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            wait = next(delays, None)
            reason = _reason(exc)
            if wait is None:
                raise PacsUnavailable(
                    f"{what}: no answer after {attempt} attempt(s) ({reason})") from exc
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", what, attempt, reason,
                        wait)
            sleep(wait)


def _reason(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__
