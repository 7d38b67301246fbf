"""Uploads in progress per API key: a bound on what one key can hold open at once.

Each upload holds a staging folder and a connection until its body is in; a
client that opens many and stalls them would tie up both. The count is per API
process (a deployment with several API processes allows that many times more).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from disa.core.errors import DisaError


class TooManyUploads(DisaError):
    """The key has `limit` uploads in progress already."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this API key has {limit} uploads in progress already; "
                         "wait for one to finish")
        self.limit = limit


class UploadSlots:
    """Counts uploads in progress per owner (API key owner name, or None without keys)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str | None, int] = {}
        self._guard = threading.Lock()

    def in_progress(self, owner: str | None) -> int:
        with self._guard:
            return self._active.get(owner, 0)

    @contextlib.contextmanager
    def hold(self, owner: str | None) -> Iterator[None]:
        """One slot of `owner` for the block; TooManyUploads when all are taken."""
        with self._guard:
            active = self._active.get(owner, 0)
            if active >= self.limit:
                raise TooManyUploads(self.limit)
            self._active[owner] = active + 1
        try:
            yield
        finally:
            with self._guard:
                left = self._active[owner] - 1
                if left:
                    self._active[owner] = left
                else:
                    del self._active[owner]
