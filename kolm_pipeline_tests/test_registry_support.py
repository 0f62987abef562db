"""Builders shared by the registry, swap and serving tests (this module holds no tests of its own).

They produce what the pipeline produces — a PEFT adapter directory and a ``.kolm`` whose receipt
chain (corpus → recipe → adapter → evaluation → artifact) is signed with a real tenant key — without
running the training stages, so each test builds what it needs in milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from kolm_pipeline.provenance.receipts import receipt_cid
from kolm_pipeline.registry import build_kolm, cid_for_bytes, ensure_tenant_keys, load_private_key, make_receipt
from kolm_pipeline.registry.artifact import adapter_file_cids

LABELS = ["billing", "shipping", "technical"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def fake_adapter(path: Path, seed: int = 0) -> Path:
    """A small PEFT-shaped adapter directory (not loadable into a model): enough for registry tests."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-base", "r": 2,
              "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((2, 8), np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((8, 2), np.float32)},
              str(path / "adapter_model.safetensors"))
    return path


def real_adapter(base_dir: Path, path: Path, seed: int, rank: int = 8) -> Path:
    """A random (not identity) LoRA adapter for the model in ``base_dir``, saved as PEFT writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(str(path))
    return path


def signed_artifact(
    output: Path,
    *,
    adapter_dir: Path,
    keys_dir: Path,
    task: str = "acme.support",
    tenant: str = "acme",
    k: float = 0.8,
    k_current: float = 0.5,
    labels: list[str] | None = None,
    base_digest: str = "0" * 64,
    capture_range: tuple[int, int] = (1, 160),
    salt: str = "",
    json_schema: dict | None = None,
    vision: dict | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """A ``.kolm`` as the deployment stage builds it, chain signed with ``tenant``'s key in ``keys_dir``; with
    ``json_schema``, of a JSON task (verifier ``json_schema``)."""
    keyid = ensure_tenant_keys(keys_dir, tenant)
    key = load_private_key(keys_dir, tenant)
    corpus_cid = cid_for_bytes(f"corpus {task} {salt}".encode())
    recipe_cid = cid_for_bytes(f"recipe {task} {salt}".encode())
    adapter_cid = cid_for_bytes(f"adapter {task} {salt}".encode())
    stages = [
        ("corpus", corpus_cid, {"capture_range": list(capture_range), "stats": {"written": 160}}),
        ("recipe", recipe_cid, {"corpus_cid": corpus_cid, "k_floor": 0.3}),
        ("adapter", adapter_cid, {"recipe_cid": recipe_cid, "trainer_version": "test-trainer/1",
                                  "files": adapter_file_cids(adapter_dir)}),
        ("evaluation", cid_for_bytes(f"evaluation {salt}".encode()), {"candidate_k": k, "current_k": k_current}),
    ]
    receipts: list[bytes] = []
    for stage, subject, predicate in stages:
        receipts.append(make_receipt(stage=stage, subject_name=stage, subject_cid=subject,
                                     predicate={"task": task, "tenant": tenant, **predicate},
                                     previous_cid=receipt_cid(receipts[-1]) if receipts else None,
                                     private_key=key, keyid=keyid))
    decision = {"swap": True, "reason": f"swap: K improves by {k - k_current:+.4f}", "k_floor": 0.3,
                "k_new": k, "k_current": k_current, "delta": k - k_current, "alert": False}
    evaluation = {"candidate": {"name": "candidate", "k": k}, "current": {"name": "base", "k": k_current},
                  "decision": decision}
    manifest = {
        "task": task, "tenant": tenant, "namespace": task.split(".", 1)[-1],
        "base_model": {"id": "tiny-base", "digest": base_digest}, "lora": {"r": 8},
        "corpus_cid": corpus_cid, "recipe_cid": recipe_cid, "adapter_cid": adapter_cid,
        "trainer_version": "test-trainer/1", "output_kind": "categorical" if labels else "free_text",
        "verifier": "closed_vocab" if labels else "text_match", "labels": labels, "evals": evaluation,
        **({"output_kind": "json", "verifier": "json_schema", "json_schema": json_schema} if json_schema else {}),
        "counters": {"captured": 160, "kept": 160, "discarded": 0, "untriaged": 0}, "parent_cid": None,
        **({"vision": vision} if vision else {}),
        **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    build_kolm(output, manifest=manifest, adapter_dir=adapter_dir, evals=evaluation, receipts=receipts,
               signer=(key, keyid))
    return output


def shared_mlflow_uri(tmp_path_factory) -> str:
    """One MLflow database for all registry tests of a session (creating one takes seconds); tests that use
    it give their tasks distinct names."""
    path = tmp_path_factory.getbasetemp() / "kolm-shared-mlflow"
    path.mkdir(exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def clean_env(monkeypatch, **values: str) -> None:
    """Set environment variables for one test, dropping ones that would leak production settings in."""
    for name in ("KOLM_ARTIFACTS_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
