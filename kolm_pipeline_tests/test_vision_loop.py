"""Issue 26, vision-language adapters end to end on a tiny random SmolVLM/Idefics3-style model: the openai SDK sends
images through the capture proxy to a stand-in teacher (a "frontier VLM" that names an image's colour), a triage
rule keeps the pairs, the Dagster loop distills an adapter of the language model, gates it against the bare base and
deploys it, and `kolm serve` answers image requests with it."""

from __future__ import annotations

import base64
import io
import json
import threading

import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.registry.artifact import read_kolm
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.settings import load_settings
from kolm_pipeline_tests.test_capture import start_proxy  # noqa: F401 (fixture)
from kolm_pipeline_tests.test_registry_support import free_port, wait_until

COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 210)}
QUESTION = "What colour is this picture? Answer with the colour only."
VISION_RUN = {"ops": {"corpus": {"config": {"min_pairs": 40}},
                      "adapter": {"config": {"epochs": 6, "learning_rate": 0.02, "batch_size": 4}}}}


def _picture(colour: str, shade: int) -> bytes:
    from PIL import Image

    red, green, blue = COLOURS[colour]
    buffer = io.BytesIO()
    Image.new("RGB", (24 + shade % 9, 24), (red, green, min(255, blue + shade))).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _teacher_app() -> FastAPI:
    """The stand-in teacher: names the dominant colour of the request's image."""
    from PIL import Image

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
        colour = ("red", "green", "blue")[max(range(3), key=lambda channel: pixel[channel])]
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": colour},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}}

    return app


def _ask(client: openai.OpenAI, model: str, url: str) -> str:
    reply = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
    return reply.choices[0].message.content


def test_images_through_the_proxy_to_a_deployed_vision_adapter_and_back(start_proxy, tiny_vlm, monkeypatch):  # noqa: F811
    with BackgroundServer(_teacher_app()) as teacher:
        proxy = start_proxy(teacher.url)
        client = proxy.openai()
        for shade in range(30):
            for colour in COLOURS:
                assert _ask(client, "gpt-4o", _data_url(_picture(colour, shade))) == colour
        rows = proxy.captures()
    assert len(rows) == 90 and all("base64" not in json.dumps(row.messages) for row in rows)
    proxy.store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")

    monkeypatch.setenv("KOLM_HOME", str(proxy.home))
    monkeypatch.setenv("DAGSTER_HOME", str(proxy.home / "dagster"))
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_vlm))
    settings = load_settings(proxy.home)
    instance = ensure_instance(settings)
    result, outcomes = materialize_namespace(instance, "acme.support", VISION_RUN)
    assert result.success, [o for o in outcomes if o.status != "success"]

    def metadata(asset: str) -> dict:
        import dagster as dg

        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        return {key: getattr(value, "value", value) for key, value in event.asset_materialization.metadata.items()}

    corpus, evaluation = metadata("corpus"), metadata("evaluation")
    assert corpus["written"] >= 80 and corpus["unsupported_dropped"] == 0  # the images were kept, as placeholders
    assert evaluation["accuracy_candidate"] > evaluation["accuracy_current"] + 0.3  # the bare base names no colour
    artifact = read_kolm(read_pointer(settings.adapters_dir, "acme.support"))
    assert artifact.manifest["vision"]["processor"] == "Idefics3Processor"
    assert len(artifact.manifest["vision"]["processor_digest"]) == 64

    # `kolm serve` on the vision base answers an image it never saw with the deployed adapter.
    from kolm_pipeline.serve.app import create_serving_app
    from kolm_pipeline.serve.runtime import ServingRuntime
    from kolm_pipeline.serve.vision import VisionBackend

    runtime = ServingRuntime(settings, VisionBackend(str(tiny_vlm), settings.models_dir), poll_interval=0.05)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_serving_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=60, what="the serving app to start")
        served = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=proxy.key, max_retries=0)
        answers = [_ask(served, "acme.support", _data_url(_picture(colour, 40 + shade)))  # shades it never saw
                   for shade in range(2) for colour in COLOURS]
        assert sum(answer == colour for answer, colour in zip(answers, list(COLOURS) * 2, strict=True)) >= 5
        with pytest.raises(openai.BadRequestError, match="not a PNG, JPEG, GIF or WEBP"):
            _ask(served, "acme.support", _data_url(b"not a picture at all"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
