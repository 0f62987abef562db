"""`kolm serve` on a vision-language base: requests may carry images (OpenAI `image_url` parts with a base64
`data:` URL), answered by the task's adapter on the language model.

The adapters sit in the same `LoraSlots` as on a text base (a LoRA on the language model's projections is plain
linear layers there too), so loading, selecting and unloading, and so hot swaps, work the same way. Answers are
generated one request at a time under one lock: no batching and no constrained label choice yet (a label task's
answer is generated, and verified as usual by whoever reads it).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from kolm_pipeline.capture.images import ImageError, inline_images
from kolm_pipeline.serve.backends import BackendError, model_placement
from kolm_pipeline.train.vision import render


def request_conversation(messages: list[dict]) -> tuple[list[tuple[str, list[str | None]]], list[bytes]]:
    """A request's turns as `render` takes them (a part is text, or None for an image) and its images' bytes."""
    plain, images = inline_images(messages)
    conversation = []
    for message in plain:
        content = message["content"]
        parts: list[str | None] = []
        for part in content if isinstance(content, list) else [{"type": "text", "text": str(content)}]:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image":
                parts.append(None)
            elif parts and parts[-1] is not None:  # adjacent text parts, joined as the corpus joins them
                parts[-1] += "\n" + str(part.get("text", ""))
            else:
                parts.append(str(part.get("text", "")))
        conversation.append((message["role"], parts))
    return conversation, images


def decoded(data: bytes):
    """The image, RGB (already verified and bounded in pixels by ``inline_images``); ImageError when its pixels do
    not decode."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - verified, yet the pixels do not decode
        raise ImageError(f"an image cannot be decoded ({type(exc).__name__}: {exc})") from None


class VisionBackend:
    """A vision-language base and LoRA adapters of its language model, in this process."""

    accepts_images = True

    def __init__(self, base_model: str, models_dir: Path) -> None:
        self._spec = (base_model, Path(models_dir))
        self._lock = threading.Lock()
        self._model = None
        self._processor = None
        self._slots = None
        self.base_digest: str | None = None
        self.placement = ""
        self.processor_digest: str | None = None  # an adapter trained with another processor is refused

    def start(self) -> None:
        if self._model is not None:
            return
        from kolm_pipeline.evaluate.lora_slots import LoraSlots
        from kolm_pipeline.train.base_model import resolve_base_model
        from kolm_pipeline.train.vision import load_vision, processor_digest

        base = resolve_base_model(*self._spec)
        if not base.vision:
            raise BackendError(f"{base.model_id} is not a vision-language model")
        self._model, self._processor = load_vision(base)
        self._slots = LoraSlots(self._model)
        self.base_digest = base.digest
        self.processor_digest = processor_digest(base)
        self.placement = model_placement(self._model)

    def loaded(self) -> list[str]:
        return self._slots.names() if self._slots is not None else []

    def load(self, name: str, adapter_dir: Path, labels: list[str] | None, ready: Callable[[], None],
             json_schema: dict | None = None) -> None:
        from kolm_pipeline.evaluate.lora_slots import AdapterFormatError

        try:
            self._slots.load(name, adapter_dir)
        except AdapterFormatError as exc:
            raise BackendError(f"cannot load adapter {adapter_dir} into the base model: {exc}") from exc
        with self._lock:
            ready()

    def unload(self, name: str) -> None:
        with self._lock:
            self._slots.unload(name)

    def check_prompt(self, messages: list[dict], max_tokens: int) -> None:
        """Refuse (BackendError: a 400) a request whose images cannot be read here: given by URL, not an image,
        too large, or text holding the base's image token. Checks only: the pixels are decoded once, by `stream`."""
        self._conversation(messages)

    def _conversation(self, messages: list[dict]) -> tuple[list[tuple[str, list[str | None]]], list[bytes]]:
        from kolm_pipeline.train.vision import literal_image_token

        try:
            conversation, images = request_conversation(messages)  # each image verified and bounded once, here
        except ImageError as exc:
            raise BackendError(str(exc)) from None
        if literal_image_token(self._processor, [p for _, parts in conversation for p in parts if p is not None]):
            raise BackendError(f"a text part holds {self._processor.image_token!r}, this base's image marker")
        return conversation, images

    def _inputs(self, messages: list[dict]):
        conversation, images = self._conversation(messages)
        try:
            pictures = [decoded(data) for data in images]
        except ImageError as exc:
            raise BackendError(str(exc)) from None
        text = render(self._processor, conversation)  # the prompt training and evaluation rendered
        encoded = self._processor(text=[text], images=[pictures] if pictures else None, return_tensors="pt")
        device = next(self._model.parameters()).device
        return {key: value.to(device) for key, value in encoded.items()}

    def stream(self, name: str, messages: list[dict], labels: list[str] | None, max_tokens: int,
               usage: dict | None = None, json_schema: dict | None = None) -> Iterator[str]:
        import torch

        inputs = self._inputs(messages)
        tokenizer = self._processor.tokenizer
        with self._lock, torch.inference_mode():
            try:
                self._slots.select(name)
            except KeyError:
                raise BackendError(f"adapter {name} is not loaded") from None
            output = self._model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        if usage is not None:
            usage.update(prompt_tokens=int(inputs["input_ids"].shape[1]), completion_tokens=int(new.shape[0]))
        yield tokenizer.decode(new, skip_special_tokens=True).strip()

    def close(self) -> None:
        self._model = self._slots = None
