"""API keys: the settings hold SHA-256 digests, never keys; comparison in constant time."""

from __future__ import annotations

import hashlib
import hmac


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key (what DISA_API_KEYS lists)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_accepted(key: str, digests: tuple[str, ...]) -> bool:
    """True if `key` hashes to one of `digests`.

    Every digest is compared (no early exit) with hmac.compare_digest, so the
    time taken says nothing about which digest, or how much of it, matched.
    """
    candidate = key_digest(key)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(candidate, digest)
    return accepted
