"""Issue 26, vision-language pieces on their own: corpus rows with images, decontamination by image and text, the
vision tower setting, and a text-only server refusing image parts."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest

from kolm_pipeline.capture.images import CapturedImage, ImageStore, placeholder
from kolm_pipeline.corpus.build import build_corpus
from kolm_pipeline.corpus.decontaminate import Decontaminator
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.objectstore import DirectoryStore
from kolm_pipeline.store.records import KeptPair


def _png(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pair(pair_id: int, digest: str | None, text: str = "What colour is this?") -> KeptPair:
    content = [{"type": "text", "text": text}]
    if digest:
        content.insert(0, {"type": "image_url", "image_url": {"url": f"kolm-image:sha256:{digest}"}})
    return KeptPair(id=pair_id, messages=[{"role": "user", "content": content}], output="blue", model="m",
                    latency_us=1, prompt_tokens=1, completion_tokens=1, created_at=datetime.now(UTC), tags=[])


def test_rows_with_images_need_a_vision_base_and_keep_their_images_apart():
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    pairs = [_pair(i + 1, digest) for i, digest in enumerate(digests)] + [_pair(9, None)]
    text_only, stats = build_corpus(pairs)
    assert stats.unsupported_dropped == 4 and stats.written == 1  # a text base learns nothing from a picture
    with_images, stats = build_corpus(pairs, images=True)
    # Same words, same answer, other pictures: no near-duplicates of each other.
    assert stats.unsupported_dropped == 0 and stats.written == 5
    assert all(placeholder(digest).encode() in with_images for digest in digests)


def test_decontamination_compares_a_picture_only_with_the_same_picture():
    same, other = "a" * 64, "b" * 64
    texts = [f"{placeholder(same)}\nWhat colour is this?", f"{placeholder(other)}\nWhat colour is this?",
             f"{placeholder(same)}\nWhat colour is this?", "What colour is this?"]
    vectors = np.tile(np.array([[1.0, 0.0]]), (4, 1))  # every text the same to MiniLM: only images tell them apart
    decontaminator = Decontaminator(texts, vectors, embed=lambda batch: np.tile([[1.0, 0.0]], (len(batch), 1)))
    assert decontaminator.clean([1, 2, 3], {0: "eval"}) == [1, 3]
    assert [(r.row, r.reason) for r in decontaminator.removals] == [(2, "exact")]


def test_the_vision_tower_setting_adapts_it_too(tiny_vlm, tmp_path):
    from safetensors.torch import load_file

    from kolm_pipeline.train.base_model import resolve_base_model
    from kolm_pipeline.train.vision import train_vision_adapter

    store = ImageStore(DirectoryStore(tmp_path / "objects"))
    rows = []
    for shade in range(4):
        data = _png(shade * 40)
        image = CapturedImage(hashlib.sha256(data).hexdigest(), "image/png", data)
        store.put(image)
        rows.append({"messages": [{"role": "user", "content": placeholder(image.digest) + " colour?"},
                                  {"role": "assistant", "content": "blue"}]})
    base = resolve_base_model(str(tiny_vlm), tmp_path / "models")
    for tower in (False, True):
        out = tmp_path / f"adapter-{tower}"
        train_vision_adapter(rows, base, out, TrainConfig.parse({"epochs": 1, "batch_size": 2, "vision_tower": tower}),
                             store)
        keys = load_file(str(out / "adapter_model.safetensors")).keys()
        assert any("text_model" in key for key in keys)
        assert any("vision_model" in key for key in keys) is tower
    with pytest.raises(Exception, match="none of the 4 training rows could be read"):
        train_vision_adapter(rows, base, tmp_path / "none", TrainConfig.parse({"epochs": 1}), None)


def test_a_text_only_server_refuses_image_parts():
    from kolm_pipeline.serve.app import BadRequest, _parse

    body = {"model": "acme.support", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "hi"}]}]}
    with pytest.raises(BadRequest, match="reads text only"):
        _parse(body)
    with pytest.raises(BadRequest, match="not a PNG, JPEG, GIF or WEBP image"):
        _parse(body, images=True)
    with pytest.raises(BadRequest, match="content\\[0\\] must be a text or image_url part"):
        _parse({"model": "t", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, images=True)


def test_training_and_serving_render_the_same_prompt(tiny_vlm, tmp_path):
    """A corpus row (image placeholder, a newline, the question) and the request it came from (an image part and a
    text part) become the same prompt: what the adapter learnt is what it is asked."""
    from transformers import AutoProcessor

    from kolm_pipeline.serve.vision import request_conversation
    from kolm_pipeline.train.vision import prompt, render

    processor = AutoProcessor.from_pretrained(str(tiny_vlm))
    data = _png(90)
    image = CapturedImage(hashlib.sha256(data).hexdigest(), "image/png", data)
    store = ImageStore(DirectoryStore(tmp_path / "objects"))
    store.put(image)
    trained, pictures = prompt(processor, [{"role": "user", "content": placeholder(image.digest) + "\nWhat colour?"}],
                               store)
    request = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + __import__("base64").b64encode(
            data).decode()}}, {"type": "text", "text": "What colour?"}]}]
    conversation, images = request_conversation(request)
    served = render(processor, conversation)
    assert trained == served and len(pictures) == len(images) == 1
    assert trained.count(processor.image_token) == 1 and "What colour?" in trained and "User:" in trained
    # A base whose only template is its text model's (strings): the image token stands in the text instead.
    processor.chat_template = None
    processor.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                         "{% endif %}")
    trained = prompt(processor, [{"role": "user", "content": placeholder(image.digest) + "\nWhat colour?"}], store)[0]
    assert trained == render(processor, conversation) and "<|im_start|>user" in trained
    assert trained.count(processor.image_token) == 1


def test_kolm_serve_refuses_an_adapter_trained_with_another_processor(tiny_vlm, tmp_path):
    """The manifest records the processor's digest; a vision runtime whose base has another processor (templates,
    image processing) refuses the artifact and keeps serving what it served, saying why."""
    from kolm_pipeline.registry.swap import publish_artifact, swap_pointer
    from kolm_pipeline.serve.runtime import ServingRuntime
    from kolm_pipeline.serve.vision import VisionBackend
    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.train.base_model import resolve_base_model
    from kolm_pipeline_tests.test_registry_support import fake_adapter, signed_artifact

    settings = load_settings(tmp_path / "home")
    base = resolve_base_model(str(tiny_vlm), settings.models_dir)
    artifact = signed_artifact(tmp_path / "a.kolm", adapter_dir=fake_adapter(tmp_path / "adapter"),
                               keys_dir=settings.keys_dir, base_digest=base.digest,
                               vision={"processor": "Idefics3Processor", "processor_digest": "0" * 64})
    published = publish_artifact(settings.artifacts_dir, "acme.support", artifact)
    swap_pointer(settings.adapters_dir, "acme.support", published)
    runtime = ServingRuntime(settings, VisionBackend(str(tiny_vlm), settings.models_dir), poll_interval=0.05)
    runtime.start()
    try:
        refused = runtime.status()["refused"]["acme.support"]
        assert "another processor" in refused["reason"] and runtime.status()["tasks"] == {}
    finally:
        runtime.stop()
