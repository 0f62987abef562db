"""PII redaction applied to every capture before it is stored or spooled: typed placeholders such as
`<EMAIL>` replace emails (in any script), phone numbers (international, and national ones written with a
trunk 0 or in the North American plan), card numbers (Luhn-checked), US SSNs (with separators, or nine digits
after an SSN label), IBANs in either case (country length and mod-97 checked), IP addresses and
API-key-shaped strings. Unlabelled hex strings and UUIDs (git SHAs, digests, request ids), version strings,
dates, timestamps and order numbers are left alone. docs/pii.md lists the formats, the limits, and recall and
precision on a labelled set.

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
from kolm_pipeline.store import CaptureStore, NewCapture


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


# Length of the IBAN of each country that issues them (SWIFT's IBAN registry): with the mod-97 check it keeps
# a lowercase run of letters and digits from passing for one by chance, and it says where an IBAN ends when a
# word follows it ("be68 5390 0754 7034 then").
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def _iban(match: str) -> bool:
    compact = match.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
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


_NOT_DIGIT = re.compile(r"[^0-9]")
_DIGITS = re.compile(r"[0-9]+")
_LOOSE_SEPARATOR = re.compile(r"(?<!\))[ .\-](?!\()")  # one not next to a bracketed group
_SIGNED_DECIMAL = re.compile(r"\+[0-9]+\.[0-9]+")


def _phone(match: str) -> bool:
    """International numbers (`+` or `00`, then 9-15 digits); national ones that start with a trunk 0 (9-12
    digits in groups, 10 or 11 in one: a bare 9-digit number is an id) or are North American (10 digits, or
    11 after a 1). A national number's separators are one character throughout, apart from those next to a
    bracketed area code: "2024-05-01 12" and "05.01.2024 12" are a date and an hour, not a phone number."""
    digits = _NOT_DIGIT.sub("", match)
    if len(digits) < 9:
        return False
    if match[0] == "+" or (match.startswith("00") and len(digits) < len(match)):
        if _SIGNED_DECIMAL.fullmatch(match):  # +3.14159265358979
            return False
        digits = _NOT_DIGIT.sub("", match.replace("(0)", ""))  # +49 (0)30: a trunk 0 the caller from abroad drops
        digits = digits[2:] if match[0] == "0" else digits
        return 9 <= len(digits) <= 15 and digits[0] != "0"
    if len(set(_LOOSE_SEPARATOR.findall(match))) > 1:
        return False
    sizes = [len(group) for group in _DIGITS.findall(match)]
    if digits[0] == "0":
        lengths = range(9, 13) if len(sizes) > 1 else range(10, 12)
        return digits[1] != "0" and min(sizes) >= 2 and len(digits) in lengths
    if len(digits) == 11 and digits[0] == "1":
        digits, sizes = digits[1:], sizes[1:] if sizes[0] == 1 else [sizes[0] - 1, *sizes[1:]]
    return len(digits) == 10 and digits[0] in "23456789" and digits[3] in "23456789" and sizes in ([10], [3, 3, 4])


def _ssn_digits(match: str) -> bool:
    """Nine digits that the SSA could have issued: no 000, 666 or 9xx area, no 00 group, no 0000 serial."""
    return match[:3] not in ("000", "666") and match[0] != "9" and match[3:5] != "00" and match[5:] != "0000"


def _key_shaped(match: str) -> bool:
    """A long token that mixes letters and digits, as generated keys do (plain words and numbers do not)."""
    return bool(re.search(r"[A-Za-z]", match) and re.search(r"\d", match)) and len(set(match)) >= 10


_HEX_OR_UUID = re.compile(r"[0-9A-Fa-f]+|[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")
# A piece of a name or path: a word of up to three humps ("deepseek", "HuggingFaceTB"), maybe with a version
# after it ("central1", "SmolLM2"), a number, or a short mix ("R1", "v3p1", "8x7B"). A generated key's pieces
# are long mixes of letters and digits, or of lower and upper case.
_NAME_PIECE = re.compile(r"(?:[a-z]+)?(?:[A-Z]+[a-z]*){0,3}[0-9]{0,3}[A-Za-z]?|[0-9]+|[A-Za-z0-9]{1,4}")
_NAME_SEPARATORS = re.compile(r"[-_/+=]+")


def _name_piece(piece: str) -> bool:
    return len(piece) <= 24 and _NAME_PIECE.fullmatch(piece) is not None  # short: the humps never backtrack long


def _unlabelled_key(match: str) -> bool:
    """Key-shaped, and neither a hex string or UUID (git SHAs, digests, request ids) nor a name or path made
    of words and numbers ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "/api/v1/users/12345/orders"), which a
    conversation about code is full of. A labelled one (`token: <uuid>`) is still a key."""
    if not _key_shaped(match) or _HEX_OR_UUID.fullmatch(match) is not None:
        return False
    return not all(_name_piece(piece) for piece in _NAME_SEPARATORS.split(match) if piece)


@dataclass(frozen=True)
class Recognizer:
    """`trim`: when the whole match fails `validate`, the longest part before a space that passes is taken
    (the pattern may have run on into the next word or number: "+44 20 7946 0958 24", "… 7034 then")."""

    entity: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    trim: bool = False

    def redact(self, text: str) -> str:
        placeholder = f"<{self.entity}>"
        labelled = "value" in self.pattern.groupindex

        def replace_match(match: re.Match[str]) -> str:
            """The whole match, or only its `value` group when the pattern has one (a label before it stays)."""
            whole = match.group(0)
            if not labelled:
                if self.validate is None or self.validate(whole):
                    return placeholder
                cut = whole.rfind(" ") if self.trim else -1
                while cut > 0:
                    if self.validate(whole[:cut]):
                        return placeholder + whole[cut:]
                    cut = whole.rfind(" ", 0, cut)
                return whole
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
# An address's characters: `\w` (letters and digits of every script) and the combining marks of the scripts
# that write with them, which `\w` leaves out (`उपयोगकर्ता` would be cut at each vowel sign), and the
# zero-width joiners. Indic blocks are taken whole, but for the danda and double danda (sentence stops).
_ADDRESS = (
    r"\w\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0900-\u0963"
    r"\u0966-\u0dff\u0e31-\u0e4e\u0eb1-\u0ecd\u0f18\u0f19\u0f35\u0f37\u0f39\u0f71-\u0f84\u102b-\u103e"
    r"\u1056-\u1099\u1ab0-\u1aff\u1dc0-\u1dff\u200c\u200d\u20d0-\u20ff\u3099\u309a\ufe20-\ufe2f"
)
# A phone number: an optional `+`, then up to eight groups of digits, a bracketed one ("(415)", "(0)") among
# them, one separator between groups. Not inside a word, a number, a version or a path, and not followed by
# more of a number ("-", ".5", ",5"): the validator decides the rest.
_PHONE = (
    r"(?<![\w+\-.,/#])(?=\+?\(?[0-9](?:[ .\-()]{0,2}[0-9]){8})"  # nine digits ahead: short numbers fail fast
    r"\+?(?:\([0-9]{1,5}\)|[0-9]{1,15})"
    r"(?:[ .\-]?\([0-9]{1,5}\)|(?:[ .\-]|(?<=\)))[0-9]{1,15}){0,7}(?![\w\-]|[.,][0-9])"
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
        "API_KEY", re.compile(r"(?<![A-Za-z0-9_\-+/])[A-Za-z0-9_\-+/]{32,}={0,2}(?![A-Za-z0-9_\-+/])"), _unlabelled_key
    ),
    Recognizer(
        "EMAIL",
        re.compile(
            f"(?<![{_ADDRESS}.%+\\-])[{_ADDRESS}.%+\\-]+@[{_ADDRESS}\\-]+(?:\\.[{_ADDRESS}\\-]+)*"
            f"\\.(?=[^\\W\\d_])[{_ADDRESS}\\-]{{2,}}(?![{_ADDRESS}\\-])"
        ),
    ),
    Recognizer(
        "IBAN",
        re.compile(
            r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?(?![A-Za-z0-9])"
        ),
        _iban,
        trim=True,
    ),
    Recognizer("CREDIT_CARD", re.compile(r"(?<![\w+\-.])[2-6](?:[ -]?\d){12,18}(?![\d-])"), _card),
    Recognizer("US_SSN", re.compile(r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b")),
    Recognizer(
        "US_SSN",
        re.compile(
            r"(?i)\b(?:ssn|ss\#|social[ \t]+security(?:[ \t]+(?:number|num|no\.?|\#))?)"
            r"(?:\s*(?:[:=\#-]|is|was|number|num|no\.?))*\s*(?P<value>[0-9]{9})\b"
        ),
        _ssn_digits,
    ),
    Recognizer("IP_ADDRESS", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w\-]|\.\d)"), _ip),
    Recognizer("IP_ADDRESS", re.compile(r"(?i)(?<![0-9a-f:.])[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?![0-9a-f:])"), _ip),
    Recognizer("PHONE", re.compile(_PHONE), _phone, trim=True),
)
ENTITIES: tuple[str, ...] = tuple(dict.fromkeys(r.entity for r in RECOGNIZERS))
# Every recognizer's match holds one of these: an `@`; two colons at most four hex digits apart (IPv6); a run
# of 11+ key characters (the shortest prefixed key, a JWT's first part, is 11; a labelled key's value is 12+;
# an unprefixed key 32+); a run of 9+ digits and separators that starts and ends with a digit (phone numbers
# have 9+ digits, cards 13+, a labelled SSN 9, a separated one is 11 characters); a digit, a dot and a digit
# (IPv4); or two letters and two digits (an IBAN's start, in either case). Text with none of them cannot hold
# anything to redact: one scan instead of one per recognizer, and most chat text, short numbers such as order
# ids and prices included, ends there.
# Key characters are those the labelled-key recognizer's `(?i)[A-Za-z0-9_\-./+=]` takes: with IGNORECASE
# `[A-Za-z]` also takes İ, ı, ſ and the Kelvin sign, so a key with one of them every ten characters has no
# 11-run otherwise. They are spelled out rather than matched ignoring case (a test compares the two classes
# on every code point), and the scan is four cheap ones rather than one alternation tried at every
# position: together a third of what the single case-insensitive pattern cost the writer.
_IPV6_COLONS = re.compile(r":[0-9A-Fa-f]{0,4}:")
_NUMBER_SHAPES = re.compile(r"\d(?:[\d .()+\-]{7,}\d|\.\d|(?<=[A-Za-z][A-Za-z]\d)\d)")  # tried at digits only
KEY_CHARACTERS = "A-Za-z0-9_\\-./+=\u0130\u0131\u017f\u212a"
_KEY_RUN = re.compile(f"[{KEY_CHARACTERS}]{{11}}")


# ASCII text is scanned as two class strings of its bytes, one C pass each: key characters as `k` (then an
# 11-run is a substring), and digits as `0`, letters as `A`, the number separators ` ()+-` as `s` (the dot
# stays a dot): then two number shapes are substrings too, and the long number a pattern that starts with a
# literal. Less than half of what the two patterns cost on a chat message.
_KEY_CLASSES = bytes(
    ord("k") if c < 128 and re.fullmatch(f"[{KEY_CHARACTERS}]", chr(c)) else ord(" ") for c in range(256)
)
_NUMBER_CLASSES = bytes(
    ord("0") if chr(c) in "0123456789" else ord("A") if c < 128 and chr(c).isalpha() else ord("s")
    if chr(c) in " ()+-" else ord(".") if chr(c) == "." else ord("_") for c in range(256)
)  # fmt: skip
_KEY_RUN_CLASSES = b"k" * 11
_LONG_NUMBER_CLASSES = re.compile(rb"0[0.s]{7,}0")
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
_LABELS_REMEMBERED = 4096  # clean model names and tags a redactor remembers (then it starts afresh)


class Redactor:
    """Redacts the entities named (all of `ENTITIES` by default); an empty selection redacts nothing."""

    def __init__(self, entities: Iterable[str] | None = None) -> None:
        chosen = ENTITIES if entities is None else tuple(entities)
        unknown = sorted(set(chosen) - set(ENTITIES))
        if unknown:
            raise InvalidInput(f"unknown PII entities {unknown}: known are {', '.join(ENTITIES)}")
        self.entities = frozenset(chosen)
        self._recognizers = tuple(r for r in RECOGNIZERS if r.entity in self.entities)
        self._clean_labels: set[str] = set()

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
        """The record with every string of its messages, its output, its tags and its model name redacted;
        `record` itself when nothing changed.

        The messages are first scanned once as compact JSON: every string of them is in that text, escaped
        only where it holds a quote, a backslash or a control character, none of which a recognizer or the
        pre-scan matches, so text with nothing PII-shaped has none in any message (structure and the
        structural fields can only add false alarms, which take the walk below). One scan instead of a walk
        over every message and field: most conversations end there."""
        messages = record.messages
        if self._recognizers and may_hold_pii(dumps_compact(messages)):
            messages = self.value(messages)
        output = self.text(record.output_text)
        model = self._label(record.model)
        tags = record.tags
        if tags:
            redacted_tags = [self._label(tag) for tag in tags]
            if redacted_tags != tags:
                tags = list(dict.fromkeys(redacted_tags))  # two tags redacted alike are stored once
        unchanged = messages is record.messages and output is record.output_text and tags is record.tags
        if unchanged and model == record.model:
            return record
        return replace(record, messages=messages, output_text=output, model=model, tags=tags)

    def _label(self, text: str) -> str:
        """A model name or a tag, redacted as text is. Those found clean are remembered: the same few recur on
        every capture, and a dated model name ("claude-3-5-sonnet-20241022") gets past the pre-scan every time.
        Only clean ones, so the redactor never holds on to PII."""
        if text in self._clean_labels:
            return text
        redacted = self.text(text)
        if redacted is text:
            if len(self._clean_labels) >= _LABELS_REMEMBERED:
                self._clean_labels.clear()
            self._clean_labels.add(text)
        return redacted


def namespace_redactor(store: CaptureStore, tenant: str, namespace: str) -> Redactor:
    """The namespace's redaction (`redact_entities`), as its captures get it: every entity by default, and
    every entity when the stored choice names one this version does not know."""
    entities = store.namespace_settings(tenant, namespace).redact_entities
    try:
        return Redactor() if entities is None else Redactor(entities)
    except ValueError:
        return Redactor()


def validate_entities(entities: Iterable[str] | None) -> list[str] | None:
    """Check a namespace's redaction choice; None means all entities."""
    if entities is None:
        return None
    return sorted(Redactor(entities).entities)
