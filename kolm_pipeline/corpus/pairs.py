"""The chat-pair row, declared once: one JSONL line `{"messages": [..., {"role": "assistant", ...}], "weight"?,
"meta"?}`. It is the format of `corpus.jsonl`, of a recipe's `train`/`eval`/`holdout` splits and of the trainer's
input, and this module is the one reader of all of them: every bad line is named with its file and line.

(`kolm capture import` accepts more on the way in — content-part lists, `prompt`/`completion` lines — and
normalises them into captures; what leaves the store as a corpus is always this row.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

# A pair's provenance weight: a finite number >= 0 (0: never learn from it); booleans are not numbers here.
Weight = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]
_WEIGHT = TypeAdapter(Weight)
_SHAPE = "expected {'messages': [..., {'role': 'assistant', 'content': ...}]} with at least two messages"


class ChatMessage(BaseModel):
    """One message; other keys (a `name`, say) are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str


class ChatPair(BaseModel):
    """A conversation whose last message is the answer to learn, with its provenance `weight` (the trainer scales
    the pair's loss by it) and free-form `meta` (capture id, eval-candidate flag)."""

    model_config = ConfigDict(extra="allow", strict=True)

    messages: Annotated[list[ChatMessage], Field(min_length=2)]
    weight: Weight = 1.0
    meta: Any = None  # free-form: a capture id, the eval-candidate flag; not checked

    @model_validator(mode="after")
    def _ends_with_the_answer(self) -> ChatPair:
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        return self

    @classmethod
    def problem(cls, row: object) -> str | None:
        """Why `row` is not a chat pair, as a reader of the file would want it said; None when it is one."""
        if not isinstance(row, dict):
            return _SHAPE
        try:
            cls.model_validate(row)
        except ValidationError as exc:
            return _describe(exc.errors()[0], row)
        return None


def weight_problem(weight: object) -> str | None:
    """Why a row's `"weight"` is unusable, or None: it must be a finite number >= 0."""
    try:
        _WEIGHT.validate_python(weight)
    except ValidationError:
        return f"'weight' must be a non-negative number, got {weight!r}"
    return None


def _describe(error: dict, row: dict) -> str:
    where = error["loc"]
    if not where or where[0] != "messages":
        if where and where[0] == "weight":
            return f"'weight' must be a non-negative number, got {row['weight']!r}"
        return str(error["msg"]).removeprefix("Value error, ")
    if len(where) == 1:
        return _SHAPE
    position = where[1]
    field = where[2] if len(where) > 2 else "role"
    return f"message {position} has no string {field!r}"


def scan_pairs(text: str, source: str) -> tuple[list[dict], list[str]]:
    """The rows of chat-pair JSONL `text` and a problem line ("SOURCE:LINE: why") for every bad line."""
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{source}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        problem = ChatPair.problem(row)
        if problem:
            problems.append(f"{source}:{number}: {problem}")
            continue
        rows.append(row)
    return rows, problems


def scan_pair_file(path: Path) -> tuple[list[dict], list[str]]:
    """`scan_pairs` of a file; a missing or non-UTF-8 file is one problem naming it."""
    if not path.is_file():
        return [], [f"{path}: missing"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]
    return scan_pairs(text, str(path))
