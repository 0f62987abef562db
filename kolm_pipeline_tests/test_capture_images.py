"""Issue 26, vision capture: images in requests (OpenAI `image_url` data URLs, Anthropic base64 blocks) are stored
once by digest with a reference in the capture, checked at the door, limited per namespace, never fetched when
given by URL, and removed by retention with the captures that refer to them."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import timedelta

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture.images import (
    REFERENCE_PREFIX,
    CapturedImage,
    ImageError,
    check_images,
    externalize,
    sniff,
)
from kolm_pipeline.stages.retention import sweep_retention
from kolm_pipeline_tests.test_capture import Proxy, start_proxy, teacher  # noqa: F401 (fixtures)
from kolm_pipeline_tests.test_store import store  # noqa: F401 (fixture)


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _ask(client: openai.OpenAI, url: str, text: str = "I was charged twice") -> None:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])


def _object(proxy: Proxy, digest: str):
    return proxy.home / "artifacts" / "images" / digest


def test_the_kinds_of_image_and_their_references():
    png = _png((255, 0, 0))
    assert sniff(png) == "image/png" and sniff(b"GIF89a...") == "image/gif" and sniff(b"hello") is None
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(png)}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png).decode()}},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]
    out, images, urls = externalize(messages)
    digest = hashlib.sha256(png).hexdigest()
    assert [image.digest for image in images] == [digest, digest] and urls == 1
    assert out[0]["content"][0]["image_url"]["url"] == REFERENCE_PREFIX + digest
    assert out[0]["content"][1]["source"] == {"type": "kolm-image", "media_type": "image/png",
                                              "digest": "sha256:" + digest}
    assert out[0]["content"][2] == messages[0]["content"][2]
    check_images(out, from_client=False)  # the proxy's own references, stored
    with pytest.raises(ImageError, match="the proxy's own"):  # a client naming a stored image is refused
        check_images(out)
    assert isinstance(images[0], CapturedImage) and images[0].size == len(png)
    # A screenshot coming back inside an Anthropic tool_result is stored like any other image.
    nested = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png).decode()}}]}]}]
    out, images, _ = externalize(nested)
    assert [image.digest for image in images] == [digest]
    assert out[0]["content"][0]["content"][0]["source"]["type"] == "kolm-image"
    assert externalize([{"role": "user", "content": [{"type": "image", "source": {"type": "file",
                                                                                   "file_id": "f"}}]}])[2] == 1


def test_openai_images_are_stored_once_by_digest(start_proxy, teacher):  # noqa: F811
    proxy = start_proxy(teacher)
    png = _png((0, 128, 255))
    digest = hashlib.sha256(png).hexdigest()
    client = proxy.openai()
    _ask(client, _data_url(png))
    _ask(client, _data_url(png), "Where is my parcel?")
    rows = proxy.captures()
    assert len(rows) == 2
    for row in rows:
        part = row.messages[0]["content"][1]
        assert part == {"type": "image_url", "image_url": {"url": REFERENCE_PREFIX + digest, "detail": "low"}}
        assert "base64" not in str(row.messages)
        assert proxy.store.capture_image_digests(row.request_id) == [digest]
    assert _object(proxy, digest).read_bytes() == png
    assert proxy.store.image_bytes("acme", "support") == len(png)  # two captures, one image


def test_anthropic_base64_images_are_stored_too(start_proxy, teacher):  # noqa: F811
    proxy = start_proxy(teacher)
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    digest = hashlib.sha256(jpeg).hexdigest()
    proxy.anthropic().messages.create(model="claude-sonnet-4", max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                     "data": base64.b64encode(jpeg).decode()}},
        {"type": "text", "text": "I was charged twice"}]}])
    [row] = proxy.captures()
    assert row.messages[-1]["content"][0]["source"] == {"type": "kolm-image", "media_type": "image/jpeg",
                                                         "digest": "sha256:" + digest}
    assert _object(proxy, digest).read_bytes() == jpeg


def test_an_image_url_is_recorded_never_fetched(start_proxy, teacher):  # noqa: F811
    hits: list[str] = []
    app = FastAPI()

    @app.get("/{path:path}")
    async def anything(request: Request) -> Response:
        hits.append(str(request.url))
        return Response(_png((1, 2, 3)), media_type="image/png")

    with BackgroundServer(app) as images:
        proxy = start_proxy(teacher)
        url = f"{images.url.replace('127.0.0.1', 'localhost')}/private/cat.png"  # an IP would be redacted
        _ask(proxy.openai(), url)
        [row] = proxy.captures()
    assert row.messages[0]["content"][1]["image_url"]["url"] == url
    assert hits == [] and proxy.store.capture_image_digests(row.request_id) == []

    # An operator fetched it and imports the bytes: the capture refers to the stored image from then on.
    from kolm_pipeline.cli import main

    picture, not_picture = proxy.home / "cat.png", proxy.home / "cat.txt"
    picture.write_bytes(_png((5, 5, 250)))
    not_picture.write_text("meow")
    base = ["--home", str(proxy.home), "capture", "import-image", "--namespace", "acme.support", "--url"]
    assert main([*base, url, "--file", str(not_picture)]) == 1
    assert main([*base, url + "?other", "--file", str(picture)]) == 1  # no capture gave that URL: nothing stored
    assert not (proxy.home / "artifacts" / "images").exists()
    assert main([*base, url, "--file", str(picture)]) == 0
    digest = hashlib.sha256(picture.read_bytes()).hexdigest()
    [row] = proxy.captures()
    assert row.messages[0]["content"][1]["image_url"] == {"url": REFERENCE_PREFIX + digest, "detail": "low"}
    assert proxy.store.capture_image_digests(row.request_id) == [digest]
    assert _object(proxy, digest).read_bytes() == picture.read_bytes()


def test_an_image_that_is_not_an_image_is_refused_and_nothing_is_stored(start_proxy, teacher):  # noqa: F811
    proxy = start_proxy(teacher)
    client = proxy.openai()
    for url, why in ((_data_url(b"hello, not a picture"), "is not a PNG, JPEG, GIF or WEBP image"),
                     (_data_url(_png((1, 2, 3))[:40]), "the image cannot be read"),
                     ("data:image/png;base64,%%%", "not valid base64"),
                     ("ftp://example.com/x.png", "data: URL or an http(s) URL")):
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, url)
        assert refused.value.status_code == 400
        assert "messages[0].content[1]" in refused.value.message and why in refused.value.message
    assert proxy.captures() == []
    assert not (proxy.home / "artifacts" / "images").exists()


def test_the_namespace_byte_limit_and_retention(start_proxy, teacher):  # noqa: F811
    proxy = start_proxy(teacher)
    small, large = _png((9, 9, 9)), _png((200, 10, 10)) + b"\x00" * 4000  # trailing bytes: still a PNG
    proxy.store.set_switches("acme", "support", actor="test", image_bytes_limit=len(small) + 100)
    client = proxy.openai()
    _ask(client, _data_url(small))
    _ask(client, _data_url(large), "Where is my parcel?")
    _ask(client, _data_url(small))  # the namespace holds it already: it costs nothing more, and is kept
    first, second, third = proxy.captures()
    assert proxy.store.capture_image_digests(third.request_id) == [hashlib.sha256(small).hexdigest()]
    assert proxy.store.capture_image_digests(first.request_id) == [hashlib.sha256(small).hexdigest()]
    assert second.messages[0]["content"][1]["image_url"]["url"] == "kolm-image:dropped:namespace-image-limit"
    assert not _object(proxy, hashlib.sha256(large).hexdigest()).exists()

    # Past the window the captures expire, and the image with them.
    settings = proxy.app.state.settings
    report = sweep_retention(settings, proxy.store, now=proxy.store.clock() + timedelta(days=31))
    assert report.images == 1 and not _object(proxy, hashlib.sha256(small).hexdigest()).exists()
    assert proxy.store.image_bytes("acme", "support") == 0


def test_an_image_stays_while_any_live_capture_refers_to_it(store):  # noqa: F811 (SQLite and PostgreSQL)
    """Two captures send the same image; the older one expires: the image is not dead until the newer one is."""
    from datetime import UTC, datetime

    from kolm_pipeline.store import NewCapture

    store.create_tenant("acme")
    now = datetime.now(UTC)
    digest = "ab" * 32

    def capture(request_id: str, days_ago: int) -> NewCapture:
        return NewCapture(request_id=request_id, tenant="acme", namespace="support", provider="openai", model="m",
                          messages=[{"role": "user", "content": "hi"}], output_text="ok", latency_us=1,
                          status="ok", http_status=200, created_at=now - timedelta(days=days_ago),
                          images=[(digest, "image/png", 10)])

    store.insert_captures_once([capture("a" * 32, 40), capture("b" * 32, 1)])
    store.insert_captures_once([capture("b" * 32, 1)])  # a replayed batch adds no second reference
    assert store.capture_image_digests("b" * 32) == [digest]
    store.apply_retention(now=now)
    assert store.dead_image_digests() == [] and store.image_bytes("acme", "support") == 10
    store.apply_retention(now=now + timedelta(days=30))
    assert store.dead_image_digests() == [digest] and store.image_bytes("acme", "support") == 0
    # A capture of the same image arriving meanwhile keeps its reference, and with it the image.
    store.insert_captures_once([capture("c" * 32, 0)])
    assert store.forget_dead_images([digest]) == []
    assert store.capture_image_digests("a" * 32) == [] and store.capture_image_digests("c" * 32) == [digest]


def test_an_image_no_capture_came_to_refer_to_goes_after_the_window(tmp_path):
    """The writer stores an image before its capture row; if the store then refuses the record (quarantined), no
    reference ever names the image: it goes once older than the strictest window, and not a moment before."""
    import os
    from datetime import UTC, datetime

    from kolm_pipeline.capture.images import ImageStore
    from kolm_pipeline.provenance.objectstore import DirectoryStore
    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.stages.retention import sweep_images
    from kolm_pipeline.store import CaptureStore

    settings = load_settings(tmp_path / "home")
    images = ImageStore(DirectoryStore(settings.artifacts_dir))
    old, fresh = _png((1, 1, 1)), _png((2, 2, 2))
    for data in (old, fresh):
        images.put(CapturedImage(hashlib.sha256(data).hexdigest(), "image/png", data))
    aged = datetime.now(UTC) - timedelta(days=40)
    os.utime(settings.artifacts_dir / "images" / hashlib.sha256(old).hexdigest(), (aged.timestamp(),) * 2)
    captures = CaptureStore(settings.store_url)
    assert sweep_images(settings, captures, datetime.now(UTC) - timedelta(days=30)) == 1
    assert set(images.stored()) == {hashlib.sha256(fresh).hexdigest()}
    captures.close()
