"""`kolm capture import`: existing pairs from a JSONL file brought into a namespace as if captured.

Each line is one pair, in chat format (`{"messages": [..., {"role": "assistant", "content": ...}]}`, the
final assistant message being the answer) or prompt/completion format (`{"prompt": ..., "completion":
...}`); a line may also name a `model` and a list of `tags`, and other keys are ignored. Every line is
checked before anything is written: a file with bad lines is refused whole, naming each as `FILE:LINE: why`.

Rows then take the proxy's path: the namespace's redaction (its `redact_entities`, every entity by default)
is applied before anything is stored, they are written in one transaction (all or nothing), tagged
`source:<source>`, and triaged as captured rows are. The product keeps "the pairs a person (or an explicit
rule) approved": pairs imported with `--source human` were written or approved by a person, so they are
kept at once (`triaged_by` `import:human`); `ai` and `import` pairs go through the namespace's triage rules
and what no rule matches stays untriaged for a person to review. The source also sets each pair's training
weight (`KOLM_SOURCE_WEIGHTS`).

A pair's request id is an HMAC of its content under the tenant's secret, so importing the same file again
(or a file that repeats pairs) stores each pair once and reports the rest as skipped; the id reveals
nothing of the (unredacted) content to someone without the secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kolm_pipeline.capture.redact import namespace_redactor
from kolm_pipeline.provenance.errors import InvalidInput, UserError
from kolm_pipeline.store import CaptureStore, ImportOutcome, NewCapture, validate_tags

IMPORT_SOURCES = ("human", "ai", "import")
DEFAULT_MODEL = "imported"
HUMAN_APPROVAL = "import:human"
_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_MODEL_LENGTH = 255
_REQUEST_ID_PREFIX = "import-"


class ImportFileError(UserError, ValueError):
    """A file that cannot be imported; `problems` lists every bad line as `FILE:LINE: why`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n  ".join(problems)
        super().__init__(f"{len(problems)} problem(s), nothing was imported:\n  {lines}")


class Progress(Protocol):
    """What a progress bar offers (tqdm does)."""

    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


ProgressFactory = Callable[[str, int], Progress]


@dataclass(frozen=True)
class ImportedPair:
    """One valid line: the prompt messages, the answer, and what the line said about itself."""

    messages: list[dict[str, Any]]
    output: str
    model: str | None
    tags: list[str]

    def identity(self) -> str:
        """The pair's content as canonical JSON: what makes two lines the same pair (tags and model aside)."""
        return json.dumps({"messages": self.messages, "output": self.output}, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ImportSummary:
    """What an import did, for the CLI's summary line."""

    pairs: int
    outcome: ImportOutcome

    @property
    def skipped(self) -> int:
        """Pairs of the file not written: stored before, or repeated within the file."""
        return self.pairs - self.outcome.imported

    def line(self) -> str:
        o = self.outcome
        untriaged = o.imported - o.kept - o.discarded
        return (
            f"imported {o.imported} of {self.pairs} pairs (kept {o.kept}, discarded {o.discarded}, "
            f"untriaged {untriaged}); skipped {self.skipped} already imported or repeated"
        )


def _text(content: object) -> str | None:
    """Message content as text: a string, or a list of text parts joined; None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                return None
            if not isinstance(part.get("text"), str):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None


def _chat_pair(messages: object) -> tuple[list[dict[str, Any]], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise InvalidInput("'messages' must be a list of at least a user message and the final assistant message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInput(f"message {index} is not an object")
        if message.get("role") not in _ROLES:
            raise InvalidInput(f"message {index} has role {message.get('role')!r}: expected one of {', '.join(_ROLES)}")
        content = message.get("content")
        tool_call = message["role"] == "assistant" and content is None  # an earlier turn that called a tool
        if index < len(messages) - 1 and not tool_call and _text(content) is None:
            raise InvalidInput(f"message {index}: 'content' must be a string or a list of text parts")
    *prompt, last = messages
    if last["role"] != "assistant":
        raise InvalidInput(f"the last message must be the assistant's answer, not {last['role']!r}")
    answer = _text(last.get("content"))
    if answer is None or not answer.strip():
        raise InvalidInput("the final assistant message has no text content")
    if not any(message["role"] == "user" for message in prompt):
        raise InvalidInput("no user message before the answer")
    return prompt, answer


def _completion_pair(data: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    prompt, completion = data.get("prompt"), data.get("completion")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("'prompt' must be a non-empty string")
    if not isinstance(completion, str) or not completion.strip():
        raise InvalidInput("'completion' must be a non-empty string")
    return [{"role": "user", "content": prompt}], completion


def parse_line(raw: bytes) -> ImportedPair | None:
    """One line of the file; None for a blank line. Raises ValueError saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise InvalidInput("expected a JSON object")
    has_chat, has_completion = "messages" in data, "prompt" in data or "completion" in data
    if has_chat and has_completion:
        raise InvalidInput("give either 'messages' or 'prompt'/'completion', not both")
    if has_chat:
        messages, output = _chat_pair(data["messages"])
    elif has_completion:
        messages, output = _completion_pair(data)
    else:
        raise InvalidInput("expected 'messages' (chat format) or 'prompt' and 'completion'")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > _MAX_MODEL_LENGTH):
        raise InvalidInput(f"'model' must be a non-empty string of at most {_MAX_MODEL_LENGTH} characters")
    tags = data.get("tags", [])
    if not isinstance(tags, list):
        raise InvalidInput("'tags' must be a list of strings")
    return ImportedPair(messages, output, model, validate_tags(tags))


def parse_file(path: Path, progress: ProgressFactory | None = None) -> list[ImportedPair]:
    """Every pair of the file; raises ImportFileError naming every bad line (and only then)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    bar = progress("checking", len(lines)) if progress is not None else None
    pairs: list[ImportedPair] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        try:
            pair = parse_line(raw)
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
        else:
            if pair is not None:
                pairs.append(pair)
        if bar is not None and number % 1000 == 0:
            bar.update(1000)
    if bar is not None:
        bar.update(len(lines) % 1000)
        bar.close()
    if problems:
        raise ImportFileError(problems)
    if not pairs:
        raise ImportFileError([f"{path}: no pairs to import (the file is empty)"])
    return pairs


def import_file(
    store: CaptureStore,
    path: Path,
    tenant: str,
    namespace: str,
    source: str,
    tags: Iterable[str] = (),
    model: str = DEFAULT_MODEL,
    actor: str = "import",
    progress: ProgressFactory | None = None,
) -> ImportSummary:
    """Check, redact and store every pair of `path` in `tenant.namespace`, all or nothing."""
    if source not in IMPORT_SOURCES:
        raise InvalidInput(f"invalid source {source!r}: expected one of {', '.join(IMPORT_SOURCES)}")
    if not model.strip() or len(model) > _MAX_MODEL_LENGTH:
        raise InvalidInput(f"the model name must be 1-{_MAX_MODEL_LENGTH} characters")
    extra_tags = validate_tags([f"source:{source}", *tags])
    pairs = parse_file(Path(path), progress)
    redactor = namespace_redactor(store, tenant, namespace)
    digests = store.keyed_digests(tenant, (f"{namespace}\n{pair.identity()}" for pair in pairs))
    request_ids = [_REQUEST_ID_PREFIX + digest[: 64 - len(_REQUEST_ID_PREFIX)] for digest in digests]
    # Pairs stored before, or repeated in the file, are skipped before the (costly) redaction; the store
    # checks again inside its transaction.
    seen = store.stored_request_ids(request_ids)
    bar = progress("redacting", len(pairs)) if progress is not None else None
    records = []
    for number, (pair, request_id) in enumerate(zip(pairs, request_ids, strict=True), start=1):
        if bar is not None and number % 1000 == 0:
            bar.update(1000)
        if request_id in seen:
            continue
        seen.add(request_id)
        record = NewCapture(
            request_id=request_id,
            tenant=tenant,
            namespace=namespace,
            provider="openai",  # the messages are in OpenAI chat format
            model=pair.model or model,
            messages=pair.messages,
            output_text=pair.output,
            latency_us=0,  # nothing was measured: latency and usage stay out of the teacher's figures
            status="ok",
            http_status=200,
            tags=validate_tags([*extra_tags, *pair.tags]),
            source=source,
        )
        records.append(redactor.capture(record))
    if bar is not None:
        bar.update(len(pairs) % 1000)
        bar.close()
    bar = progress("writing", len(records)) if progress is not None and records else None
    try:
        outcome = store.import_captures(
            records,
            actor=actor,
            kept_by=HUMAN_APPROVAL if source == "human" else None,
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    return ImportSummary(pairs=len(pairs), outcome=outcome)
