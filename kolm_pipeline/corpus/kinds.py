"""What kind of output a namespace produces, decided from the observed answers alone.

The kind picks the verifier (ARCHITECTURE.md): categorical → `closed_vocab` (and constrained decoding),
JSON → `json_schema` with a schema inferred from the answers, extractive → `byte_grounded`, anything
else → `text_match`. Every decision comes with the evidence behind it, for diagnostics.json.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from kolm_pipeline.corpus.json_grammar import GROUNDED_IN_KEY, GROUNDED_KEY, ORDER_KEY, WHOLE_WORDS_KEY
from kolm_pipeline.corpus.spans import json_text, message_texts, occurs

# A closed set may be large (CLINC150's 150 intents, a support desk's 70-odd queues): label decoding walks a
# trie, so its cost does not grow with the number of labels; what makes a set closed is that its answers repeat
# (MIN_PER_LABEL), not that it is small. The cap only keeps the spec and its diagnostics readable.
MAX_LABELS = 1000
MAX_LABEL_WORDS = 5
MAX_LABEL_CHARS = 64
MIN_PER_LABEL = 3  # a closed vocabulary repeats itself: at least this many answers per label on average
JSON_SHARE = 0.95  # answers that must parse as JSON objects for a JSON task (the rest are dropped, listed)
GROUNDED_SHARE = 0.90  # answers that must occur verbatim in their input for an extractive task
MAX_ENUM = 12
# Free strings and arrays are bounded at BOUND_FACTOR times the longest seen: generous for the teacher's answers,
# and it stops a constrained decoder that is unsure (the bare base) from writing one string or list until
# max_new_tokens.
BOUND_FACTOR = 2
MIN_BOUND_CHARS = 32
MIN_BOUND_ITEMS = 4
MAX_KEY_NAMES = 200  # a map's key names are listed (propertyNames) up to this many
# A free string is grounded (decoded as text copied from the request) when at least this share of its values, and
# at least MIN_GROUNDED of them, occur verbatim in their request: decoding could not write the others at all.
GROUNDED_STRING_SHARE = 0.98
MIN_GROUNDED = 20

VERIFIER_FOR_KIND = {
    "categorical": "closed_vocab",
    "json": "json_schema",
    "extractive": "byte_grounded",
    "free_text": "text_match",
}


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def messages_text(messages: list[dict]) -> str:
    """The text of a conversation's messages, one per line (what an extraction may copy from)."""
    return "\n".join(str(m.get("content", "")) for m in messages)


def prompt_text(row: dict) -> str:
    return messages_text(row["messages"][:-1])


@dataclass
class KindDecision:
    """The output kind, what its verifier needs, and why."""

    kind: str
    labels: list[str] | None = None
    json_schema: dict | None = None
    reason: str = ""
    evidence: dict = field(default_factory=dict)
    # Rows (by index) whose answer does not fit the kind, e.g. unparseable JSON in a JSON task.
    misfits: list[int] = field(default_factory=list)

    @property
    def verifier(self) -> str:
        return VERIFIER_FOR_KIND[self.kind]

    def spec_fields(self) -> dict:
        fields: dict = {"output_kind": self.kind, "verifier": self.verifier}
        if self.labels is not None:
            fields["labels"] = self.labels
        if self.json_schema is not None:
            fields["json_schema"] = self.json_schema
        return fields


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _key_order(objects: list[dict]) -> list[str] | None:
    """One order of keys that every object writes its keys in (ties broken by the order first seen), or None
    when the objects write some keys in contradicting orders (a cycle of "comes before")."""
    first_seen: dict[str, int] = {}
    followers: dict[str, set[str]] = defaultdict(set)
    for value in objects:
        keys = list(value)
        for key in keys:
            first_seen.setdefault(key, len(first_seen))
        for before, after in itertools.pairwise(keys):
            followers[before].add(after)
    waiting = Counter(after for afters in followers.values() for after in afters)
    ready = [(rank, key) for key, rank in first_seen.items() if not waiting[key]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, key = heapq.heappop(ready)
        order.append(key)
        for after in followers.get(key, ()):
            waiting[after] -= 1
            if not waiting[after]:
                heapq.heappush(ready, (first_seen[after], after))
    return order if len(order) == len(first_seen) else None


def _map_schema(seen: dict[str, list]) -> dict:
    """An object as a map: any of its keys in any order, each value fitting what was seen under any key; the
    key names listed when they look like a closed set (at most MAX_KEY_NAMES, none seen only once)."""
    schema: dict = {"additionalProperties": infer_json_schema([item for items in seen.values() for item in items])}
    if len(seen) <= MAX_KEY_NAMES and min(len(items) for items in seen.values()) >= 2:
        schema["propertyNames"] = {"enum": sorted(seen)}
        # True of every parsed answer anyway; it bounds a decoder that would repeat keys until max_new_tokens.
        schema["maxProperties"] = len(seen)
    return schema


def infer_json_schema(values: list) -> dict:
    """A JSON Schema that every observed value satisfies: the types seen (integer widened to number when
    both occur), object keys present in every value required, array items inferred from all elements,
    and an enum for strings that look like a closed set: at most MAX_ENUM distinct values, none of them
    seen only once (Good–Turing: no singletons means an unseen value is unlikely), each seen MIN_PER_LABEL
    times on average.

    Constrained decoding writes fixed properties in schema order, so an object records the order its
    answers write their keys (``x-kolm-order``, see json_grammar.py). An object whose answers write keys in
    contradicting orders, or with more than MAX_ENUM keys of which at most one is in every answer (a bag
    of optional fields, like the slots of an utterance), is a map instead: ``additionalProperties`` with
    the schema of all its values, no ``required``, its key names as ``propertyNames`` when a closed set.
    An array of enum strings never seen with a repeated item has at most as many items as the enum."""
    types = {json_type(value) for value in values}
    if {"integer", "number"} <= types:
        types.discard("integer")
    schema: dict = {"type": sorted(types)[0] if len(types) == 1 else sorted(types)}
    objects = [value for value in values if isinstance(value, dict)]
    if objects:
        seen: dict[str, list] = defaultdict(list)
        for value in objects:
            for key, item in value.items():
                seen[key].append(item)
        required = sorted(key for key, items in seen.items() if len(items) == len(objects))
        order = _key_order(objects)
        if order is None or (len(seen) > MAX_ENUM and len(required) <= 1):
            schema.update(_map_schema(seen))
        else:
            schema["properties"] = {key: infer_json_schema(seen[key]) for key in order}
            schema["required"] = required
            if len(order) > 1:
                schema[ORDER_KEY] = order
    arrays = [value for value in values if isinstance(value, list)]
    elements = [item for value in arrays for item in value]
    if elements:
        schema["items"] = infer_json_schema(elements)
        if "enum" in schema["items"] and all(len(set(value)) == len(value) for value in arrays):
            # A list drawn from a closed set, never with a repeat, holds at most every value once: a bound
            # that stops constrained decoding from repeating an item until max_new_tokens.
            schema["maxItems"] = len(schema["items"]["enum"])
        else:
            schema["maxItems"] = max(MIN_BOUND_ITEMS, BOUND_FACTOR * max(len(value) for value in arrays))
    strings = [value for value in values if isinstance(value, str)]
    if strings and types == {"string"}:
        counts = Counter(strings)
        if (
            len(counts) <= MAX_ENUM
            and min(counts.values()) >= 2
            and len(strings) >= MIN_PER_LABEL * len(counts)
        ):
            schema["enum"] = sorted(counts)
        else:
            schema["maxLength"] = max(MIN_BOUND_CHARS, BOUND_FACTOR * max(len(value) for value in strings))
    return schema


def mark_grounded(schema: dict, answers: list[tuple[object, list[dict]]]) -> dict:
    """``schema`` with ``x-kolm-grounded`` on each free string (no enum) whose values, in the (parsed answer, request
    messages) pairs, occur verbatim in their request (GROUNDED_STRING_SHARE of them, MIN_GROUNDED at least); and, on
    such a string, ``x-kolm-grounded-in: "last_user"`` where as many occur in the request's last user message, and
    ``x-kolm-whole-words`` where as many occur there as whole words (``spans.py``: the rule decoding holds them to)."""
    schema = json.loads(json.dumps(schema))  # a copy to annotate
    # id(string schema) -> values seen, in the request, in its last user message, as whole words in the source
    seen: dict[int, Counter] = defaultdict(Counter)
    nodes: dict[int, dict] = {}

    def walk(node: object, value: object, texts: list[bytes], last_user: bytes) -> None:
        if not isinstance(node, dict):
            return
        if isinstance(value, str) and "enum" not in node:
            nodes[id(node)] = node
            span = json_text(value)
            counts = seen[id(node)]
            counts["all"] += 1
            counts["request"] += any(occurs(span, text) for text in texts)
            counts["last_user"] += occurs(span, last_user)
            counts["words_request"] += any(occurs(span, text, whole_words=True) for text in texts)
            counts["words_last_user"] += occurs(span, last_user, whole_words=True)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(node.get("properties", {}).get(key, node.get("additionalProperties")), item, texts, last_user)
        elif isinstance(value, list):
            for item in value:
                walk(node.get("items"), item, texts, last_user)

    for value, messages in answers:
        walk(schema, value, *message_texts(messages))
    for key, counts in seen.items():
        def holds(name: str, counts: Counter = counts) -> bool:
            return counts["all"] >= MIN_GROUNDED and counts[name] >= GROUNDED_STRING_SHARE * counts["all"]

        if not holds("request"):
            continue
        nodes[key][GROUNDED_KEY] = True
        in_last_user = holds("last_user")
        if in_last_user:
            nodes[key][GROUNDED_IN_KEY] = "last_user"
        if holds("words_last_user" if in_last_user else "words_request"):
            nodes[key][WHOLE_WORDS_KEY] = True
    return schema


def json_objects(outputs: list[str]) -> tuple[list[dict], list[int]]:
    """The outputs that parse as JSON objects, and the indices of those that do not."""
    parsed, misfits = [], []
    for index, output in enumerate(outputs):
        try:
            value = json.loads(output)
        except json.JSONDecodeError:
            misfits.append(index)
            continue
        if isinstance(value, dict):
            parsed.append(value)
        else:
            misfits.append(index)
    return parsed, misfits


def detect_output_kind(rows: list[dict]) -> KindDecision:
    """Classify the answers: JSON, then categorical, then extractive, else free text."""
    outputs = [answer(row) for row in rows]
    count = len(outputs)
    if not count:
        return KindDecision("free_text", reason="no answers")

    parsed, misfits = json_objects(outputs)
    if len(parsed) >= JSON_SHARE * count:
        evidence = {"json_objects": len(parsed), "unparseable": len(misfits)}
        reason = f"{len(parsed)} of {count} answers parse as JSON objects"
        if misfits:
            reason += f"; the other {len(misfits)} are left out of the recipe"
        return KindDecision("json", json_schema=infer_json_schema(parsed), reason=reason, evidence=evidence,
                            misfits=misfits)

    stripped = [output.strip() for output in outputs]
    prompts = [prompt_text(row) for row in rows]
    grounded = [output in prompt for output, prompt in zip(stripped, prompts, strict=True)]
    grounded_share = sum(grounded) / count
    distinct = Counter(stripped)
    short = all(len(o.split()) <= MAX_LABEL_WORDS and len(o) <= MAX_LABEL_CHARS for o in stripped)
    if short and 2 <= len(distinct) <= MAX_LABELS and count >= MIN_PER_LABEL * len(distinct):
        labels = sorted(distinct)
        # A short answer copied out of its input, where the input names no other label, is an extraction
        # that happens to have few values in this sample (names, ids); a real closed set either does not
        # occur in the input or the input lists the options.
        exclusive = sum(
            1 for output, prompt, ok in zip(stripped, prompts, grounded, strict=True)
            if ok and not any(label != output and label in prompt for label in labels)
        )
        evidence = {"distinct_answers": len(distinct), "grounded_share": round(grounded_share, 4),
                    "grounded_and_exclusive": exclusive}
        if grounded_share >= GROUNDED_SHARE and exclusive >= GROUNDED_SHARE * count:
            return KindDecision(
                "extractive",
                reason=f"{exclusive} of {count} short answers are copied from an input that names no other "
                f"answer: an extraction, not a closed set",
                evidence=evidence,
            )
        return KindDecision(
            "categorical",
            labels=labels,
            reason=f"{count} short answers drawn from {len(labels)} distinct values",
            evidence={**evidence, "label_counts": dict(sorted(distinct.items()))},
        )
    evidence = {"grounded_share": round(grounded_share, 4), "distinct_answers": len(distinct)}
    if grounded_share >= GROUNDED_SHARE and all(stripped):
        return KindDecision(
            "extractive",
            reason=f"{sum(grounded)} of {count} answers occur verbatim in their input",
            evidence=evidence,
        )
    return KindDecision("free_text", reason="answers are varied text, not JSON, not a closed set, not copied "
                        "from the input", evidence=evidence)
