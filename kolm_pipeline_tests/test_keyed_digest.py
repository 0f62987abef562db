"""The prepared HMAC the store digests captures with is HMAC-SHA256 exactly, for any secret and text."""

from __future__ import annotations

import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_pipeline.store.keyed_digest import KeyedDigest


@settings(max_examples=300, deadline=None)
@given(secret=st.binary(max_size=200), texts=st.lists(st.text(), min_size=1, max_size=4))
def test_keyed_digest_is_hmac_sha256(secret: bytes, texts: list[str]) -> None:
    """Short, block-sized and longer-than-a-block secrets; one prepared key reused for several texts."""
    keyed = KeyedDigest(secret)
    for text in texts:
        assert keyed.hexdigest(text) == hmac.new(secret, text.encode("utf-8"), "sha256").hexdigest()


def test_block_boundary_secrets() -> None:
    for size in (0, 32, 63, 64, 65, 128):
        secret = bytes(range(size))
        assert KeyedDigest(secret).hexdigest("x") == hmac.new(secret, b"x", "sha256").hexdigest()
