"""PII redaction applied to every capture before it is stored or spooled: typed placeholders such as
`<EMAIL>` replace emails, phone numbers, card numbers (Luhn-checked), US SSNs, IBANs (mod-97 checked),
IP addresses and API-key-shaped strings.

Pattern recognizers with validators, in the spirit of Presidio's, but with no NLP model and no network:
nothing to download, a few microseconds per message, and it runs on the recorder's worker thread, never
on the response path. Recognizers run in a fixed order (most specific first) over text in which earlier
matches are already placeholders, so a card number is never half-taken for a phone number.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from operator import is_
from typing import Any

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.provenance.jsontext import dumps_compact
from kolm_pipeline.store import NewCapture


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn(digits)


def _iban(match: str) -> bool:
    compact = match.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in moved)
    return int(number) % 97 == 1


def _ip(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
    except ValueError:
        return False
    return True


def _phone(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 10 <= len(digits) <= 15


def _key_shaped(match: str) -> bool:
    """A long token that mixes letters and digits, as generated keys do (plain words and numbers do not)."""
    return bool(re.search(r"[A-Za-z]", match) and re.search(r"\d", match)) and len(set(match)) >= 10


@dataclass(frozen=True)
class Recognizer:
    entity: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None

    def redact(self, text: str) -> str:
        placeholder = f"<{self.entity}>"

        def replace_match(match: re.Match[str]) -> str:
            """The whole match, or only its `value` group when the pattern has one (a label before it stays)."""
            whole = match.group(0)
            if "value" not in match.re.groupindex:
                return placeholder if self.validate is None or self.validate(whole) else whole
            value = match.group("value")
            if self.validate is not None and not self.validate(value):
                return whole
            start = match.start("value") - match.start()
            return whole[:start] + placeholder + whole[start + len(value) :]

        return self.pattern.sub(replace_match, text)


_KEY_PREFIXES = (
    r"sk-(?:ant-|proj-|live-|test-)?[A-Za-z0-9_\-]{16,}",  # OpenAI, Anthropic, Stripe-like secret keys
    r"(?:pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    r"kolm_[A-Za-z0-9_\-]{20,}",
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{30,}",
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face tokens
    r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
)

# Order matters: keys and structured numbers before the looser phone and IP patterns. Every match must hold
# something `may_hold_pii` finds (below), or text is let through unredacted: a new recognizer extends both.
RECOGNIZERS: tuple[Recognizer, ...] = (
    Recognizer("API_KEY", re.compile(r"(?<![A-Za-z0-9_\-])(?:" + "|".join(_KEY_PREFIXES) + r")")),
    Recognizer(
        "API_KEY",
        re.compile(
            r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|bearer)[\"']?\s*[:=]?\s*[\"']?"
            r"(?P<value>[A-Za-z0-9_\-./+=]{12,})"
        ),
        _key_shaped,
    ),
    Recognizer(
        "API_KEY", re.compile(r"(?<![A-Za-z0-9_\-+/])[A-Za-z0-9_\-+/]{32,}={0,2}(?![A-Za-z0-9_\-+/])"), _key_shaped
    ),
    Recognizer("EMAIL", re.compile(r"(?i)\b[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}\b")),
    Recognizer("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), _iban),
    Recognizer("CREDIT_CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card),
    Recognizer("US_SSN", re.compile(r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b")),
    Recognizer("IP_ADDRESS", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"), _ip),
    Recognizer("IP_ADDRESS", re.compile(r"(?i)(?<![0-9a-f:.])[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?![0-9a-f:])"), _ip),
    Recognizer(
        "PHONE",
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"),
        _phone,
    ),
)
ENTITIES: tuple[str, ...] = tuple(dict.fromkeys(r.entity for r in RECOGNIZERS))
# Every recognizer's match holds one of these: an `@`; two colons at most four hex digits apart (IPv6); a run
# of 11+ key characters (the shortest prefixed key, a JWT's first part, is 11; a labelled key's value is 12+;
# an unprefixed key 32+); a run of 10+ digits and separators that starts and ends with a digit (phone numbers
# have 10+ digits, cards 13+, SSNs are 11 characters); a digit, a dot and a digit (IPv4); or two capitals and
# two digits (an IBAN's start). Text with none of them cannot hold anything to redact: one scan instead of
# one per recognizer, and most chat text, short numbers such as order ids and prices included, ends there.
# Key characters are those the labelled-key recognizer's `(?i)[A-Za-z0-9_\-./+=]` takes: with IGNORECASE
# `[A-Za-z]` also takes İ, ı, ſ and the Kelvin sign, so a key with one of them every ten characters has no
# 11-run otherwise. They are spelled out rather than matched ignoring case (a test compares the two classes
# on every code point), and the scan is four cheap ones rather than one alternation tried at every
# position: together a third of what the single case-insensitive pattern cost the writer.
_IPV6_COLONS = re.compile(r":[0-9A-Fa-f]{0,4}:")
_NUMBER_SHAPES = re.compile(r"[\dA-Z](?:(?<=\d)[\d .()+\-]{8,}\d|(?<=\d)\.\d|(?<=[A-Z])[A-Z]\d\d)")
KEY_CHARACTERS = "A-Za-z0-9_\\-./+=\u0130\u0131\u017f\u212a"
_KEY_RUN = re.compile(f"[{KEY_CHARACTERS}]{{11}}")


# ASCII text is scanned as two class strings of its bytes, one C pass each: key characters as `k` (then an
# 11-run is a substring), and digits as `0`, capitals as `A`, the number separators ` ()+-` as `s` (the dot
# stays a dot): then two number shapes are substrings too, and the long number a pattern that starts with a
# literal. Less than half of what the two patterns cost on a chat message.
_KEY_CLASSES = bytes(
    ord("k") if c < 128 and re.fullmatch(f"[{KEY_CHARACTERS}]", chr(c)) else ord(" ") for c in range(256)
)
_NUMBER_CLASSES = bytes(
    ord("0") if chr(c) in "0123456789" else ord("A") if "A" <= chr(c) <= "Z" else ord("s") if chr(c) in " ()+-"
    else ord(".") if chr(c) == "." else ord("_") for c in range(256)
)  # fmt: skip
_KEY_RUN_CLASSES = b"k" * 11
_LONG_NUMBER_CLASSES = re.compile(rb"0[0.s]{8,}0")
_SHORT = 24  # shorter texts: the two patterns cost less than building the class strings


def may_hold_pii(text: str) -> bool:
    """Whether `text` holds anything a recognizer could match (see above); False means nothing to redact."""
    if "@" in text or (":" in text and _IPV6_COLONS.search(text) is not None):
        return True
    if len(text) < _SHORT or not text.isascii():  # non-ASCII digits are `\d` too; İ, ı, ſ, K key characters
        return _NUMBER_SHAPES.search(text) is not None or _KEY_RUN.search(text) is not None
    raw = text.encode("ascii")
    if raw.translate(_KEY_CLASSES).find(_KEY_RUN_CLASSES) >= 0:
        return True
    numbers = raw.translate(_NUMBER_CLASSES)
    return numbers.find(b"0.0") >= 0 or numbers.find(b"AA00") >= 0 or _LONG_NUMBER_CLASSES.search(numbers) is not None


_NOT_REDACTED_KEYS = frozenset({"role", "type", "tool_call_id", "id"})


class Redactor:
    """Redacts the entities named (all of `ENTITIES` by default); an empty selection redacts nothing."""

    def __init__(self, entities: Iterable[str] | None = None) -> None:
        chosen = ENTITIES if entities is None else tuple(entities)
        unknown = sorted(set(chosen) - set(ENTITIES))
        if unknown:
            raise InvalidInput(f"unknown PII entities {unknown}: known are {', '.join(ENTITIES)}")
        self.entities = frozenset(chosen)
        self._recognizers = tuple(r for r in RECOGNIZERS if r.entity in self.entities)

    def text(self, text: str) -> str:
        """The text with every chosen entity replaced; `text` itself when there was nothing to replace."""
        if not self._recognizers or not may_hold_pii(text):
            return text
        redacted = text
        for recognizer in self._recognizers:
            redacted = recognizer.redact(redacted)
        return text if redacted == text else redacted

    def value(self, value: Any) -> Any:
        """Every string of a JSON-like value, except structural fields such as a message's role; `value`
        itself when nothing in it changed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            return value if all(map(is_, items, value)) else items
        if isinstance(value, dict):
            fields = {k: v if k in _NOT_REDACTED_KEYS else self.value(v) for k, v in value.items()}
            return value if all(map(is_, fields.values(), value.values())) else fields
        return value

    def capture(self, record: NewCapture) -> NewCapture:
        """The record with every string of its messages and its output redacted; `record` itself when
        nothing changed.

        The messages are first scanned once as compact JSON: every string of them is in that text, escaped
        only where it holds a quote, a backslash or a control character, none of which a recognizer or the
        pre-scan matches, so text with nothing PII-shaped has none in any message (structure and the
        structural fields can only add false alarms, which take the walk below). One scan instead of a walk
        over every message and field: most conversations end there."""
        messages = record.messages
        if self._recognizers and may_hold_pii(dumps_compact(messages)):
            messages = self.value(messages)
        output = self.text(record.output_text)
        if messages is record.messages and output is record.output_text:
            return record
        return replace(record, messages=messages, output_text=output)


def validate_entities(entities: Iterable[str] | None) -> list[str] | None:
    """Check a namespace's redaction choice; None means all entities."""
    if entities is None:
        return None
    return sorted(Redactor(entities).entities)
