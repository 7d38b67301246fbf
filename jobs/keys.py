"""API keys as the settings hold them: SHA-256 digests, never keys.

`DISA_API_KEYS` lists keys separated by commas, each as

    DIGEST                 a normal key, known by its digest prefix ("sha256:3fa9c2d1e0b4")
    NAME=DIGEST            a normal key known by NAME (letters, digits, . _ -)
    NAME=DIGEST:admin      an operator's key (PACS scripts, monitoring): sees every job

A job belongs to the key that created it; its manifest records the key's owner
name (NAME or the digest prefix), never the key nor the whole digest. Here only
the parsing, which the settings validate at start-up; who a request acts for
(and the constant-time lookup) is the API's: disa.service.security.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADMIN_ROLE = "admin"
#: Hex digits of the digest that name a key without a name of its own (48 bits).
DIGEST_PREFIX_CHARS = 12


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its digest, the owner name its jobs get, and its role."""

    owner: str
    digest: str = field(repr=False)
    admin: bool = False


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key (what DISA_API_KEYS lists)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def digest_owner(digest: str) -> str:
    """The owner name of a key listed without a name: a prefix of its digest."""
    return f"sha256:{digest[:DIGEST_PREFIX_CHARS]}"


def parse_api_keys(value: str) -> tuple[ApiKey, ...]:
    """The keys of a DISA_API_KEYS value; ValueError (one line) for a malformed entry, a
    digest or owner name given twice."""
    keys: list[ApiKey] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        keys.append(_parse_entry(entry))
    for attribute in ("digest", "owner"):
        values = [getattr(k, attribute) for k in keys]
        twice = {v for v in values if values.count(v) > 1}
        if twice:
            raise ValueError(f"DISA_API_KEYS names the {attribute} {sorted(twice)[0]} more "
                             "than once")
    return tuple(keys)


def _parse_entry(entry: str) -> ApiKey:
    name, sep, rest = entry.rpartition("=")
    rest, colon, role = rest.partition(":")
    digest = rest.strip().lower()
    if not _SHA256_HEX.match(digest):
        raise ValueError("DISA_API_KEYS holds SHA-256 hex digests of the keys (64 lowercase "
                         "hex characters), as DIGEST, NAME=DIGEST or NAME=DIGEST:admin, "
                         "comma-separated; not the keys themselves")
    if colon and role.strip().lower() != ADMIN_ROLE:
        raise ValueError(f"DISA_API_KEYS: unknown role '{role.strip()[:20]}' (the only role "
                         f"is '{ADMIN_ROLE}')")
    name = name.strip()
    if sep and not _NAME.match(name):
        raise ValueError("DISA_API_KEYS: a key name is 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return ApiKey(owner=name if sep else digest_owner(digest), digest=digest, admin=bool(colon))
