"""Images in captured requests: checked at the door, stored once by digest, referenced from the capture.

OpenAI sends images as `image_url` content parts, Anthropic as `image` blocks; either may carry the bytes inline
(a base64 `data:` URL, a `base64` source) or an http(s) URL. Inline bytes must be a PNG, JPEG, GIF or WEBP image
(what both providers accept): anything else is refused with a 400 naming the part, before it goes upstream.

When the capture is written, each inline image is stored once under its sha256 in the image store (the object
store's `images/` prefix: KOLM_ARTIFACTS_URL, by default `KOLM_HOME/artifacts/images`) and the message keeps a
reference in its place (`kolm-image:sha256:<hex>`), so the store holds no base64 and redaction never scans image
bytes. An image over its namespace's byte limit is not stored: its reference says so (`kolm-image:dropped:…`). A
URL is recorded as given and never fetched by the proxy (no request to an address a caller chose). Retention
removes an image once no capture inside its window refers to it (`stages/retention.py`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kolm_pipeline.provenance.objectstore import ObjectStore

REFERENCE_PREFIX = "kolm-image:sha256:"
# How an image stands in a training row's text (corpus → recipe → trainer and evaluation): dedup and
# decontamination see it as text, so the same image with the same words is the same input.
PLACEHOLDER = re.compile(r"<kolm-image sha256:([0-9a-f]{64})>")
DROPPED_PREFIX = "kolm-image:dropped:"
IMAGE_PREFIX = "images"
# The formats OpenAI and Anthropic both accept, by their first bytes.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class ImageError(ValueError):
    """An inline image that is not one: the message names the part."""


@dataclass(frozen=True)
class CapturedImage:
    """One inline image of a capture: its sha256 (hex), what it is, and (until stored) its bytes."""

    digest: str
    media_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def reference(self) -> str:
        return REFERENCE_PREFIX + self.digest


def sniff(data: bytes) -> str | None:
    """The image type `data` starts like, None when it is no PNG, JPEG, GIF or WEBP."""
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _decode(where: str, text: str) -> CapturedImage:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the image data is not valid base64") from None
    media_type = sniff(data)
    if media_type is None:
        raise ImageError(f"{where}: the data is not a PNG, JPEG, GIF or WEBP image")
    readable(where, data)
    return CapturedImage(hashlib.sha256(data).hexdigest(), media_type, data)


# Larger pictures are refused (a small PNG can hold a huge, empty picture that decodes to gigabytes).
MAX_PIXELS = 40_000_000


def readable(where: str, data: bytes) -> None:
    """ImageError unless `data` opens as an image of at most MAX_PIXELS whose file checks out (PIL's verify: the
    structure and checksums, without decoding every pixel)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{where}: an image of {image.width}×{image.height} pixels is more than "
                                 f"{MAX_PIXELS} pixels")
            image.verify()
    except ImageError:
        raise
    except Exception as exc:  # PIL's errors for a damaged or hostile file are many
        raise ImageError(f"{where}: the image cannot be read ({type(exc).__name__}: {exc})") from None


def _inline_openai(where: str, part: dict, from_client: bool) -> tuple[CapturedImage | None, bool]:
    """(the inline image, whether the part is an image by reference) of an OpenAI `image_url` part."""
    holder = part.get("image_url")
    url = holder.get("url") if isinstance(holder, dict) else holder
    if not isinstance(url, str):
        raise ImageError(f"{where}: an image_url part needs image_url.url")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(f"{where}: a data URL image must be base64 (data:image/png;base64,...)")
        return _decode(where, payload), False
    if url.startswith(("http://", "https://")):
        return None, True
    if url.startswith("kolm-image:"):
        if from_client:
            raise ImageError(f"{where}: kolm-image references are the proxy's own; send the image's bytes")
        return None, False
    raise ImageError(f"{where}: image_url.url must be a data: URL or an http(s) URL")


def _inline_anthropic(where: str, part: dict, from_client: bool) -> tuple[CapturedImage | None, bool]:
    source = part.get("source")
    if not isinstance(source, dict):
        raise ImageError(f"{where}: an image block needs a source")
    kind = source.get("type")
    if kind == "base64":
        data = source.get("data")
        if not isinstance(data, str):
            raise ImageError(f"{where}: a base64 image source needs data")
        return _decode(where, data), False
    if kind in ("url", "file"):  # by reference (a URL, an uploaded file's id): recorded, never fetched
        return None, True
    if kind == "kolm-image":
        if from_client:
            raise ImageError(f"{where}: kolm-image sources are the proxy's own; send the image's bytes")
        return None, False
    raise ImageError(f"{where}: image source type {kind!r} is not base64, url or file")


def _walk(content: list, where: str, from_client: bool, found: list[CapturedImage], refs: list[int]) -> list:
    """`content` with each inline image replaced by its reference (appended to `found`; references counted in
    `refs`), looking inside Anthropic `tool_result` blocks too (a computer-use screenshot comes back there)."""
    parts = []
    for position, part in enumerate(content):
        here = f"{where}[{position}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            image, by_reference = _inline_openai(here, part, from_client)
            refs[0] += by_reference
            if image is not None:
                found.append(image)
                holder = part.get("image_url")
                extra = {k: v for k, v in holder.items() if k != "url"} if isinstance(holder, dict) else {}
                part = {**part, "image_url": {**extra, "url": image.reference}}
        elif kind == "image":
            image, by_reference = _inline_anthropic(here, part, from_client)
            refs[0] += by_reference
            if image is not None:
                found.append(image)
                part = {**part, "source": {"type": "kolm-image", "media_type": image.media_type,
                                           "digest": "sha256:" + image.digest}}
        elif kind == "tool_result" and isinstance(part.get("content"), list):
            part = {**part, "content": _walk(part["content"], f"{here}.content", from_client, found, refs)}
        parts.append(part)
    return parts


def _has_images(content: object) -> bool:
    return isinstance(content, list) and any(
        isinstance(p, dict) and (p.get("type") in ("image_url", "image")
                                 or (p.get("type") == "tool_result" and _has_images(p.get("content"))))
        for p in content)


def check_images(messages: list[dict], from_client: bool = True) -> None:
    """Raise ImageError naming the first inline image that is not an image (and, from a client, any kolm-image
    reference: only the proxy makes those, for images it stored)."""
    externalize(messages, from_client)


def externalize(messages: list[dict], from_client: bool = False) -> tuple[list[dict], list[CapturedImage], int]:
    """The messages with every inline image replaced by its reference, the images, and how many were given by
    reference (a URL, a file id)."""
    images: list[CapturedImage] = []
    refs = [0]
    out = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not _has_images(content):
            out.append(message)
            continue
        out.append({**message, "content": _walk(content, f"messages[{index}].content", from_client, images, refs)})
    return out, images, refs[0]


def drop_reference(messages: list[dict], image: CapturedImage, reason: str) -> list[dict]:
    """The messages with `image`'s references marked dropped (`reason` says why), for an image not stored."""
    marker = f"{DROPPED_PREFIX}{reason}"

    def part_of(part: Any) -> Any:
        if not isinstance(part, dict):
            return part
        if part.get("type") == "tool_result" and isinstance(part.get("content"), list):
            return {**part, "content": [part_of(inner) for inner in part["content"]]}
        holder = part.get("image_url")
        if isinstance(holder, dict) and holder.get("url") == image.reference:
            return {**part, "image_url": {**holder, "url": marker}}
        source = part.get("source")
        if isinstance(source, dict) and source.get("digest") == "sha256:" + image.digest:
            return {**part, "source": {"type": "kolm-image", "dropped": reason}}
        return part

    return [{**m, "content": [part_of(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def image_store(settings) -> ImageStore:
    """Where the proxy stores captured images: beside the products and artifacts (KOLM_ARTIFACTS_URL, by default
    KOLM_HOME/artifacts), so a training pod and the retention sweep find them too."""
    from kolm_pipeline.provenance.objectstore import open_store

    return ImageStore(open_store(settings.artifacts_url, settings.artifacts_dir))


def placeholder(digest: str) -> str:
    return f"<kolm-image sha256:{digest}>"


def stored_digest(part: Any) -> str | None:
    """The digest of an image part that refers to a stored image (either provider's form), else None."""
    if not isinstance(part, dict):
        return None
    holder = part.get("image_url")
    url = holder.get("url") if isinstance(holder, dict) else None
    if isinstance(url, str) and url.startswith(REFERENCE_PREFIX):
        return url.removeprefix(REFERENCE_PREFIX)
    source = part.get("source")
    digest = source.get("digest") if isinstance(source, dict) and source.get("type") == "kolm-image" else None
    return digest.removeprefix("sha256:") if isinstance(digest, str) else None


def split_placeholders(text: str) -> tuple[list[str], list[str]]:
    """The text's pieces around its image placeholders, and the digests in order (len(pieces) = len(digests)+1)."""
    pieces = PLACEHOLDER.split(text)
    return pieces[0::2], pieces[1::2]


def inline_images(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """A served request's inline images (data URLs, base64 blocks) as bytes in order, and the messages with each
    replaced by a placeholder-free image marker (`{"type": "image"}`), as a processor's chat template wants."""
    referenced, found, by_reference = externalize(messages, from_client=True)
    if by_reference:
        raise ImageError("an image given by URL cannot be served: send the bytes (a data: URL)")
    out = [{**message, "content": [{"type": "image"} if stored_digest(part) else part for part in message["content"]]}
           if isinstance(message.get("content"), list) else message for message in referenced]
    return out, [image.data for image in found]


class ImageStore:
    """Images by sha256 in an object store (`images/<hex>`): written once, read back checked."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @staticmethod
    def key(digest: str) -> str:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return f"{IMAGE_PREFIX}/{digest}"

    def put(self, image: CapturedImage) -> None:
        key = self.key(image.digest)
        if self.objects.exists(key):
            return
        with tempfile.TemporaryDirectory(prefix="kolm-image-") as scratch:
            path = Path(scratch) / "image"
            path.write_bytes(image.data)
            self.objects.put(key, path)

    def exists(self, digest: str) -> bool:
        return self.objects.exists(self.key(digest))

    def get(self, digest: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="kolm-image-") as scratch:
            data = self.objects.get(self.key(digest), Path(scratch) / "image").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{self.objects.url(self.key(digest))} does not hash to its name")
        return data

    def delete(self, digest: str) -> None:
        self.objects.delete(self.key(digest))

    def stored(self) -> dict[str, datetime]:
        """Every stored image's digest and when it was written."""
        return {key.rsplit("/", 1)[-1]: when for key, when in self.objects.listing(IMAGE_PREFIX).items()}


def import_image_by_url(store, images: ImageStore, tenant: str, namespace: str, url: str, data: bytes) -> int:
    """An operator's copy of an image the namespace's captures gave only by `url` (which the proxy never fetches):
    checked to be an image, held to the namespace's byte limit, stored once by digest, and the captures' messages
    made to refer to it, so they can be trained on. Returns how many captures now refer to it; nothing is stored when
    none gave that URL."""
    media_type = sniff(data)
    if media_type is None:
        raise ImageError("the file is not a PNG, JPEG, GIF or WEBP image")
    readable("the file", data)
    if not store.captures_with_image_url(tenant, namespace, url):
        raise ImageError(f"no capture of {tenant}.{namespace} inside its window gives an image by {url}")
    image = CapturedImage(hashlib.sha256(data).hexdigest(), media_type, data)
    limit = store.namespace_settings(tenant, namespace).image_bytes_limit
    held = image.digest in store.live_image_digests(tenant, namespace)  # costs nothing more
    if not held and store.image_bytes(tenant, namespace) + image.size > limit:
        raise ImageError(f"{tenant}.{namespace} would hold more than its image_bytes_limit ({limit} bytes) of images")
    images.put(image)
    return len(store.attach_image_by_url(tenant, namespace, url, image.digest, media_type, image.size))
