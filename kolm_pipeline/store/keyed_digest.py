"""HMAC-SHA256 under one tenant's secret, keyed once: the capture writer digests every capture's input and
output under the same secret, so the keyed state is prepared when the secret is read and copied per text."""

from __future__ import annotations

import hmac


class KeyedDigest:
    """`hmac.new(secret, text, "sha256").hexdigest()` for any number of texts under one secret."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod="sha256")

    def hexdigest(self, text: str) -> str:
        keyed = self._keyed.copy()
        keyed.update(text.encode("utf-8"))
        return keyed.hexdigest()
