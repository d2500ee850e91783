"""
Who may call what: the cluster secret and the client token.

With a cluster secret, the registry API and every C{/internal/} endpoint answer only
requests that carry it as C{Authorization: Bearer <secret>}; kvd processes send it on every
call they make to each other. With a client token, C{/kv/} and the rest of the client API
(the gateway's C{/kv}, C{/batch}, C{/changes}, C{/export}, C{/import} and C{/cluster/key/})
answer only requests that carry the token (or the cluster secret: a gateway forwards with it).
Comparisons take the same time whatever the guess. Secrets are never logged or shown.
"""

from __future__ import annotations

import hmac

from attrs import frozen

from kvd import paths

_PROTECTED_BY_SECRET = (paths.REGISTRY, paths.INTERNAL)
#: What the client token guards: the data, and which versions of a key each replica holds.
_PROTECTED_BY_TOKEN = (paths.KV, paths.CLUSTER_KEY)
#: The client API beyond single keys, guarded like /kv/: the listing (GET /kv), batches, the
#: change feed and export (every value) and import (writes).
_CLIENT_PATHS = (paths.KV.rstrip(b"/"), paths.BATCH, paths.CHANGES, paths.EXPORT, paths.IMPORT)


class BadSecretFile(Exception):
    """A secret or token file cannot be used; the message names the file, never its contents."""


def read_secret(path: str, what: str) -> bytes:
    """The secret in C{path}: its contents without surrounding white space."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise BadSecretFile(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not secret:
        raise BadSecretFile(f"the {what} file {path} is empty")
    if any(c < 0x21 or c > 0x7E for c in secret):
        raise BadSecretFile(f"the {what} file {path} must hold one line of printable ASCII")
    return secret


@frozen(repr=False)
class Auth:
    """What this process requires of the requests it serves."""

    cluster_secret: bytes | None = None
    client_token: bytes | None = None

    def __repr__(self) -> str:
        return f"Auth(cluster_secret={'set' if self.cluster_secret else None}, client_token=...)"

    @property
    def required(self) -> bool:
        """Whether anything needs a token at all (if not, requests need no checking)."""
        return self.cluster_secret is not None or self.client_token is not None

    def allows(self, path: bytes, authorization: bytes | None) -> bool:
        """Whether a request for C{path} with this C{Authorization} header may proceed."""
        if path.startswith(_PROTECTED_BY_SECRET) or path == b"/registry":
            return self.cluster_secret is None or _matches(authorization, self.cluster_secret)
        if self.client_token is not None and (path.startswith(_PROTECTED_BY_TOKEN) or path in _CLIENT_PATHS):
            return _matches(authorization, self.client_token) or (
                self.cluster_secret is not None and _matches(authorization, self.cluster_secret)
            )
        return True


def bearer(secret: bytes) -> bytes:
    return b"Bearer " + secret


def _matches(authorization: bytes | None, secret: bytes) -> bool:
    return authorization is not None and hmac.compare_digest(authorization, bearer(secret))
