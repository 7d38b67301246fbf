"""Who a request acts for, and the lookup of its API key among the configured digests.

The format of `DISA_API_KEYS` and its parsing: disa.jobs.keys.
A job belongs to the key that created it; its manifest records the key's owner
name (NAME or the digest prefix), never the key nor the whole digest. Lookup
compares against every digest in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from disa.jobs.keys import ApiKey, key_digest


@dataclass(frozen=True)
class Caller:
    """Who a request acts for. `owner` None: authentication is off (every job is visible,
    new jobs get no owner)."""

    owner: str | None
    admin: bool

    def sees(self, job_owner: str | None) -> bool:
        """True if this caller may see and act on a job owned by `job_owner`. Jobs without
        an owner (made while authentication was off, or by an older version) are the
        admins' only once keys are configured."""
        return self.admin or (self.owner is not None and job_owner == self.owner)


#: The caller when no keys are configured: one tenant, who sees everything.
OPEN_CALLER = Caller(owner=None, admin=True)


def find_key(key: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The configured key that `key` hashes to, or None.

    Every digest is compared (no early exit) with hmac.compare_digest, so the
    time taken says nothing about which digest, or how much of it, matched.
    """
    candidate = key_digest(key)
    found: ApiKey | None = None
    for entry in keys:
        if hmac.compare_digest(candidate, entry.digest):
            found = entry
    return found


def key_accepted(key: str, digests: tuple[str, ...]) -> bool:
    """True if `key` hashes to one of `digests` (constant time over all of them)."""
    candidate = key_digest(key)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(candidate, digest)
    return accepted
