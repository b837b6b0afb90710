"""Who is calling, and may they: API keys (401) and scopes (403).

Auth is on when the database holds any key (revoked ones included: revoking the last key
must not open the server) or a static --api-key is given; otherwise every caller is
"anonymous". The keys are re-read when meta.keys_version changes (checked per request, one
indexed read), so `engine keys create / revoke / rotate` act on a running server at once.
Verified secrets are remembered per process (an HMAC of the secret under a random per-process
key, never the secret) so that scrypt runs once per key, not once per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import OrderedDict

from fastapi import Request

from engine.server.errors import APIError
from engine.server.keys import ApiKey, KeyStore, secret_prefix, verify_secret
from engine.server.limits import Principal

ANONYMOUS = Principal("anonymous")
STATIC = Principal("api-key")
_CACHE_SIZE = 4096


class Authenticator:
    """Args:
        store: the key table.
        static_key: a single key accepted besides the stored ones (--api-key), or None.
    """

    def __init__(self, store: KeyStore, static_key: str | None = None):
        self.store = store
        self.static_key = static_key
        self._version: int | None = None
        self._by_prefix: dict[str, ApiKey] = {}
        self._has_keys = False
        self._pepper = os.urandom(32)
        self._verified: OrderedDict[bytes, str] = OrderedDict()  # digest -> secret_hash

    def refresh(self) -> None:
        """Reload the keys if any changed since the last call."""
        version = self.store.version()
        if version != self._version:
            keys = self.store.list()
            self._by_prefix = {k.prefix: k for k in keys}
            self._has_keys = bool(keys)
            self._version = version

    @property
    def is_enabled(self) -> bool:
        return self._has_keys or self.static_key is not None

    async def authenticate(self, request: Request) -> Principal:
        """The caller, from `Authorization: Bearer <key>`.

        Raises:
            APIError: 401 for a missing, malformed, unknown or revoked key.
        """
        self.refresh()
        if not self.is_enabled:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        if self.static_key is not None and hmac.compare_digest(
                secret.encode(), self.static_key.encode()):
            return STATIC
        key = await self._lookup(secret)
        if key is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        if not key.is_active:
            raise APIError(401, f"API key {key.name!r} was revoked at {key.revoked_at}",
                           code="revoked_api_key")
        return Principal(key.name, key)

    async def _lookup(self, secret: str) -> ApiKey | None:
        prefix = secret_prefix(secret)
        key = self._by_prefix.get(prefix) if prefix else None
        if key is None:
            return None
        digest = hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()
        if self._verified.get(digest) == key.secret_hash:
            self._verified.move_to_end(digest)
            return key
        if not await asyncio.to_thread(verify_secret, secret, key.secret_hash):
            return None
        self._verified[digest] = key.secret_hash
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return key


def authorize(principal: Principal, endpoint: str | None = None, model: str | None = None) -> None:
    """Raise APIError 403 if the principal's key may not use this endpoint or model."""
    key = principal.key
    if key is None:
        return
    if endpoint is not None and not key.allows_endpoint(endpoint):
        raise APIError(403, f"key {key.name!r} may not use the {endpoint!r} endpoint; it may use "
                       f"{sorted(key.endpoints)}", code="endpoint_not_allowed")
    if model is not None and not key.allows_model(model):
        raise APIError(403, f"key {key.name!r} may not use model {model!r}; it may use "
                       f"{sorted(key.models)}", param="model", code="model_not_allowed")
