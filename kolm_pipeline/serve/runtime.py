"""Serving runtime (transformers + PEFT backend): the base model plus the active adapter of each task.

Before every request it reads the task's pointer; when the pointer names a new artifact, the adapter is
loaded under a CID-derived name next to the old one, and new requests go to it while requests already
running finish on the adapter they started with.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.evaluate.inference import predict
from kolm_pipeline.registry.artifact import extract_adapter, read_kolm
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.settings import Settings
from kolm_pipeline.train.base_model import load_causal_lm, load_tokenizer, resolve_base_model


class UnknownTask(Exception):
    """No adapter is deployed for the requested task."""


@dataclass(frozen=True)
class ActiveAdapter:
    task: str
    cid: str
    name: str
    labels: list[str] | None


class ServingRuntime:
    """Holds the base model once and every task's active adapter; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._active: dict[str, ActiveAdapter] = {}

    def _ensure_base(self) -> None:
        if self._model is None:
            base = resolve_base_model(self.settings.base_model, self.settings.models_dir)
            self._tokenizer = load_tokenizer(base)
            self._model = load_causal_lm(base)

    def active(self, task: str) -> ActiveAdapter:
        """The task's adapter as the pointer names it now, loading it on first sight."""
        pointer = read_pointer(self.settings.adapters_dir, task)
        if pointer is None:
            raise UnknownTask(f"no adapter is deployed for task {task!r}")
        cid = pointer.name.removesuffix(".kolm")
        current = self._active.get(task)
        if current is not None and current.cid == cid:
            return current
        with self._lock:
            self._ensure_base()
            name = "a_" + cid[-24:]
            cache = self.settings.home / "serve-cache" / cid
            if not (cache / "adapter_config.json").is_file():
                shutil.rmtree(cache, ignore_errors=True)
                extract_adapter(pointer, cache)
            self._attach(name, cache)
            manifest = read_kolm(pointer).manifest
            adapter = ActiveAdapter(task=task, cid=cid, name=name, labels=manifest.get("labels"))
            self._active[task] = adapter
            return adapter

    def _attach(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            if name not in self._model.peft_config:
                self._model.load_adapter(str(path), adapter_name=name)
        else:
            self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=name)
        self._model.eval()

    def complete(self, task: str, messages: list[dict], max_new_tokens: int = 128) -> tuple[str, ActiveAdapter]:
        """Answer one conversation with the task's active adapter."""
        adapter = self.active(task)
        with self._lock:
            self._model.set_adapter(adapter.name)
            prediction = predict(self._model, self._tokenizer, [messages], adapter.labels, max_new_tokens)[0]
        return prediction.output, adapter
