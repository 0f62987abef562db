"""The `vllm` backend performs the same hot swap against a vLLM server's runtime LoRA endpoints.

The server here is a STAND-IN FOR vLLM: a small HTTP server implementing `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, `/v1/models` and a streaming `/v1/chat/completions` that answers with the name
of the adapter it was asked for, recording every call so the test can check what the runtime did.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kolm_pipeline.registry import swap_pointer
from kolm_pipeline.registry.swap import publish_artifact
from kolm_pipeline.serve.backends import BackendError, VLLMBackend
from kolm_pipeline.serve.runtime import ServingRuntime, adapter_name
from kolm_pipeline.settings import load_settings
from kolm_pipeline_tests.test_registry_support import LABELS, fake_adapter, free_port, signed_artifact, wait_until

TASK = "acme.vllm"
ADAPTER_ROOT = "/mnt/kolm/serve-cache"  # where the stand-in "sees" the runtime's adapter cache


class StandInVLLM(ThreadingHTTPServer):
    """Stand-in for vLLM's OpenAI server with runtime LoRA updating enabled."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[tuple[str, dict]] = []
        self.loaded: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def named(self, path: str) -> list[dict]:
        with self.lock:
            return [body for called, body in self.calls if called == path]


class _Handler(BaseHTTPRequestHandler):
    server: StandInVLLM

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        models = [{"id": "base", "object": "model"}] + [{"id": name, "object": "model"} for name in self.server.loaded]
        self._reply(200, json.dumps({"object": "list", "data": models}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.server.lock:
            self.server.calls.append((self.path, body))
            loaded = self.server.loaded
            if self.path == "/v1/load_lora_adapter":
                if body["lora_name"] in loaded:
                    return self._reply(400, b'{"error": "already loaded"}')
                loaded[body["lora_name"]] = body["lora_path"]
                return self._reply(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.".encode(),
                                   "text/plain")
            if self.path == "/v1/unload_lora_adapter":
                if loaded.pop(body["lora_name"], None) is None:
                    return self._reply(404, b'{"error": "not found"}')
                return self._reply(200, b"Success", "text/plain")
            known = body.get("model") in loaded
        if self.path != "/v1/chat/completions" or not known:
            return self._reply(404, json.dumps({"error": f"no model {body.get('model')}"}).encode())
        choice = (body.get("structured_outputs") or {}).get("choice")
        answer = choice[0] if choice else f"answered by {body['model']}"
        chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in (answer[:4], answer[4:])]
        if body.get("logprobs"):  # as vLLM: each chunk's sampled tokens with their log-probabilities
            for chunk, logprob in zip(chunks, (-0.1, -0.3), strict=True):
                chunk["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": logprob}]}
        stream = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        self._reply(200, stream.encode(), "text/event-stream")


@pytest.fixture
def stand_in():
    server = StandInVLLM()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_vllm_backend_swaps_through_runtime_lora_endpoints(stand_in, tmp_path):
    settings = load_settings(tmp_path / "home")
    artifacts = [signed_artifact(tmp_path / f"{i}.kolm", adapter_dir=fake_adapter(tmp_path / f"ad{i}", seed=i),
                                 keys_dir=settings.keys_dir, task=TASK, labels=LABELS if i == 1 else None,
                                 salt=str(i)) for i in range(2)]
    cids = []
    for source in artifacts:
        published = publish_artifact(settings.artifacts_dir, TASK, source)
        cids.append(published.stem)
    swap_pointer(settings.adapters_dir, TASK, settings.artifacts_dir / TASK / f"{cids[0]}.kolm")

    backend = VLLMBackend(stand_in.url, settings.home / "serve-cache", adapter_root=ADAPTER_ROOT)
    runtime = ServingRuntime(settings, backend, poll_interval=0.05, grace_seconds=0.2)
    runtime.start()
    try:
        first, second = adapter_name(cids[0]), adapter_name(cids[1])
        assert stand_in.named("/v1/load_lora_adapter") == [
            {"lora_name": first, "lora_path": f"{ADAPTER_ROOT}/{cids[0]}"}]
        assert (settings.home / "serve-cache" / cids[0] / "adapter_config.json").is_file()
        with runtime.lease(TASK) as adapter:
            assert "".join(backend.stream(adapter.name, [{"role": "user", "content": "hi"}], adapter.labels, 8)) \
                == f"answered by {first}"

            # Swap while that request is in flight: the new adapter is loaded and warmed, then takes over.
            swap_pointer(settings.adapters_dir, TASK, settings.artifacts_dir / TASK / f"{cids[1]}.kolm")
            wait_until(lambda: runtime.status()["tasks"][TASK]["cid"] == cids[1], what="the flip to the new CID")
            loads = stand_in.named("/v1/load_lora_adapter")
            assert loads[-1] == {"lora_name": second, "lora_path": f"{ADAPTER_ROOT}/{cids[1]}"}
            warm = [b for b in stand_in.named("/v1/chat/completions") if b["model"] == second]
            assert warm and warm[0]["structured_outputs"] == {"choice": LABELS}  # warmed, label-constrained
            threading.Event().wait(0.5)
            assert stand_in.named("/v1/unload_lora_adapter") == []  # still leased past the grace period
        wait_until(lambda: stand_in.named("/v1/unload_lora_adapter"), what="the old adapter's unload")
        assert stand_in.named("/v1/unload_lora_adapter") == [{"lora_name": first}]
        assert list(stand_in.loaded) == [second]
        with runtime.lease(TASK) as adapter:
            answer = "".join(backend.stream(adapter.name, [{"role": "user", "content": "hi"}], adapter.labels, 8))
        assert answer == LABELS[0]
        assert stand_in.named("/v1/chat/completions")[-1]["model"] == second
        # Asked for usage (what `kolm serve` does for a whole answer), it asks vLLM for the tokens' logprobs too:
        # the answer's confidence, for student routing, is their geometric mean.
        usage: dict = {}
        with runtime.lease(TASK) as adapter:
            "".join(backend.stream(adapter.name, [{"role": "user", "content": "hi"}], adapter.labels, 8, usage))
        assert stand_in.named("/v1/chat/completions")[-1]["logprobs"] is True
        assert usage["confidence"] == pytest.approx(math.exp(-0.2))
        # Image parts reach vLLM as they came (a vLLM serving a vision-language model answers them).
        picture = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "What colour is this?"}]}]
        with runtime.lease(TASK) as adapter:
            "".join(backend.stream(adapter.name, picture, None, 8))
        assert stand_in.named("/v1/chat/completions")[-1]["messages"] == picture
        assert not backend.accepts_images  # `kolm serve` passes image parts only with --vllm-images
        assert VLLMBackend(stand_in.url, settings.home / "serve-cache", accepts_images=True).accepts_images
    finally:
        runtime.stop()


def test_vllm_backend_errors_are_clear(stand_in, tmp_path):
    backend = VLLMBackend(stand_in.url, tmp_path)
    with pytest.raises(BackendError, match="unload_lora_adapter answered 404"):
        backend.unload("kolm-nothing")
    with pytest.raises(BackendError, match="answered 404"):
        list(backend.stream("kolm-nothing", [{"role": "user", "content": "hi"}], None, 4))
    port = stand_in.server_address[1]
    stand_in.shutdown()
    stand_in.server_close()
    with pytest.raises(BackendError, match="not answering"):
        VLLMBackend(f"http://127.0.0.1:{port}", tmp_path, timeout=2).start()


def test_kolm_serve_refuses_bad_backend_settings_clearly(kolm_settings, capsys):
    from kolm_pipeline.cli import main

    assert main(["serve", "--backend", "vllm"]) == 1
    assert "--backend vllm needs --vllm-url" in capsys.readouterr().err
    port = free_port()
    assert main(["serve", "--backend", "vllm", "--vllm-url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"vLLM at http://127.0.0.1:{port} is not answering" in err and "Traceback" not in err
    assert main(["serve", "--max-batch", "0"]) == 1
    assert "--max-batch must be at least 1" in capsys.readouterr().err
