"""PII redaction: typed placeholders, validators that spare look-alikes, per-namespace choice, and the
proxy storing only redacted text while the client still gets the upstream's answer untouched."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_pipeline.capture.redact import ENTITIES, KEY_CHARACTERS, RECOGNIZERS, Redactor, may_hold_pii
from kolm_pipeline.store import NewCapture
from kolm_pipeline_tests.test_capture import Proxy, start_proxy, teacher  # noqa: F401 (fixtures)

CASES = [
    ("write to jane.doe+billing@example.co.uk today", "write to <EMAIL> today"),
    ("call +1 (415) 555-2671 or 020 7946 0958", "call <PHONE> or <PHONE>"),
    ("card 4111 1111 1111 1111, also 5500-0000-0000-0004", "card <CREDIT_CARD>, also <CREDIT_CARD>"),
    ("ssn 123-45-6789", "ssn <US_SSN>"),
    ("IBAN DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432", "IBAN <IBAN> or <IBAN>"),
    ("from 192.168.1.20 and 2001:db8::ff00:42:8329", "from <IP_ADDRESS> and <IP_ADDRESS>"),
    # Built at run time so no key-shaped literal sits in the repository (AWS's documented example id).
    ("keys sk-proj-" + "abcdefghijklmnop1234 " + "AKIA" + "IOSFODNN7EXAMPLE", "keys <API_KEY> <API_KEY>"),
    ("api_key=Zx9Qw8Er7Ty6Ui5Op4 and ghp_abcdefghijklmnopqrstuvwxyz0123456789", "api_key=<API_KEY> and <API_KEY>"),
]
# Things that look like PII but are not: they must survive untouched.
LOOKALIKES = [
    "card 4111 1111 1111 1112 fails the Luhn check",
    "ssn 000-12-3456 is not a valid SSN",
    "IBAN DE00 3704 0044 0532 0130 00 has a bad checksum",
    "version 1.2.3, address 999.1.1.1, time 12:30:45",
    "order 12345 shipped 2024-05-01 for $1,234.56",
    "I was charged twice",
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_redacts_each_entity(text: str, expected: str) -> None:
    assert Redactor().text(text) == expected


@pytest.mark.parametrize("text", LOOKALIKES)
def test_leaves_lookalikes(text: str) -> None:
    assert Redactor().text(text) == text


# Pieces of text that recognizers react to, near-misses, and the characters around them.
FRAGMENTS = [text for text, _ in CASES] + LOOKALIKES + [
    "eyJ" + "hbGciOiJIUzI1.eyJzdWIiOiIx.SflKxwRJSMeKKF2QT4", "eyJ" + "abcdefgh.abcdefgh.abcdefgh",  # JWT-shaped
    "sk-ant-" + "abcdefghijklmnopqrstuv", "fe80::1", "::", "a:b:c", "token: abcdefghijkl", "@", "x@y",
    "informational", "0", "+44", "-", "_", " ", "\n", ":", ".", "é", "٣",
    "DE89", "GB82WEST", "(415)", "555", "2671", "4111", "1111", "123-45-", "6789", "10.0.", "a/b+c=d.e",
    "\u017f", "\u212a", "\u0131", "\u0130",  # letters only to a case-insensitive [A-Za-z]
]
# Numbers with the separators phone, card, SSN and IP patterns allow, in any arrangement.
NUMBERISH = st.text(alphabet="0123456789٣ .-()+/", max_size=20)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12), NUMBERISH), max_size=8))
def test_redacting_only_text_that_may_hold_pii_changes_nothing(pieces: list[str]) -> None:
    """The scan that lets text through without an `@`, IPv6 colons, a long token, a long number or an
    IBAN's or IPv4's shape must never skip text a recognizer would have changed: the result equals every
    recognizer applied in turn."""
    text = "".join(pieces)
    expected = text
    for recognizer in RECOGNIZERS:
        expected = recognizer.redact(expected)
    assert Redactor().text(text) == expected


# The scan as one pattern, as it was first written: `may_hold_pii` must say exactly what this says.
SINGLE_PATTERN = re.compile(
    r"@|:[0-9A-Fa-f]{0,4}:|(?i:[A-Za-z0-9_\-./+=]{11,})|\d[\d .()+\-]{7,}\d|\d\.\d|[A-Za-z]{2}\d\d"
)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12), NUMBERISH), max_size=8))
def test_scan_in_steps_is_the_single_pattern(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert may_hold_pii(text) == (SINGLE_PATTERN.search(text) is not None)


ASCII_FRAGMENTS = [fragment for fragment in FRAGMENTS if fragment.isascii()]
ASCII_PIECES = st.one_of(
    st.sampled_from(ASCII_FRAGMENTS), st.text(alphabet=st.characters(max_codepoint=127), max_size=12), NUMBERISH.map(
        lambda text: text.replace("٣", "3")
    )
)


@settings(max_examples=600, deadline=None)
@given(st.lists(ASCII_PIECES, min_size=2, max_size=8))
def test_scan_of_ascii_text_as_class_strings_is_the_single_pattern(pieces: list[str]) -> None:
    """ASCII text of 24 characters or more is scanned as class strings of its bytes, not by the patterns."""
    text = "".join(pieces).ljust(24, "_")
    assert may_hold_pii(text) == (SINGLE_PATTERN.search(text) is not None)


# Characters JSON escapes (a quote, a backslash, control characters) next to the fragments above.
ESCAPED = ["\"", "\\", "\n", "\t", "\x00", "\x1f", "\u2028"]
PIECES = st.lists(st.one_of(st.sampled_from(FRAGMENTS + ESCAPED), st.text(max_size=12), NUMBERISH), max_size=6)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"])},
        optional={
            "content": st.one_of(
                PIECES.map("".join),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": PIECES.map("".join)}), max_size=2),
            ),
            "name": PIECES.map("".join),
        },
    ),
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(MESSAGES, PIECES.map("".join))
def test_record_scan_as_json_redacts_what_the_walk_redacts(messages: list[dict[str, object]], output: str) -> None:
    """`capture` scans a record's messages once, as JSON text, before walking them: escaping can only add
    false alarms, so it redacts exactly what walking every message and field redacts."""
    record = NewCapture("r", "t", "n", "openai", "m", messages, output, 1, "ok", 200)
    redacted = Redactor().capture(record)
    assert redacted.messages == Redactor().value(messages)
    assert redacted.output_text == Redactor().text(output)
    assert (redacted.messages is messages) == (Redactor().value(messages) is messages)


def test_key_characters_are_the_case_insensitive_class() -> None:
    """The spelled-out class takes exactly the code points `(?i)[A-Za-z0-9_\-./+=]` takes, all of them."""
    spelled, ignoring_case = re.compile(f"[{KEY_CHARACTERS}]"), re.compile(r"(?i)[A-Za-z0-9_\-./+=]")
    differ = [
        f"U+{point:04X}"
        for point in range(sys.maxunicode + 1)
        if (spelled.fullmatch(chr(point)) is None) != (ignoring_case.fullmatch(chr(point)) is None)
    ]
    assert differ == []


def _iban(country: str, bban: str) -> str:
    """A valid IBAN (mod-97 check digits computed) written in groups of four."""
    check = 98 - int("".join(str(int(char, 36)) for char in bban + country + "00")) % 97
    compact = f"{country}{check:02d}{bban}"
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        ("4155552671", "PHONE"),  # ten digits, nothing else: the shortest number the scan must see
        ("1.2.3.4", "IP_ADDRESS"),
        ("::1", "IP_ADDRESS"),
        ("a@b.io", "EMAIL"),
        ("123-45-6789", "US_SSN"),
        ("4111111111111111", "CREDIT_CARD"),
        (_iban("QA", "DOHBABCDEFGHIJKLMNOPQRSTU"), "IBAN"),  # letters in every group: only its start looks like one
        (_iban("QA", "DOHBABCDEFGHIJKLMNOPQRSTU").lower(), "IBAN"),  # and in lower case
        ("token: ab.cd/ef+gh=12", "API_KEY"),  # punctuation breaks every run of plain key characters
        ("password: abcde12345\u017ffghij67890", "API_KEY"),  # ſ: a letter only when case is ignored
        ("Bearer abcde12345\u212afghij67890", "API_KEY"),  # the Kelvin sign, likewise
    ],
)
def test_smallest_instances_get_past_the_scan(text: str, entity: str) -> None:
    """Each recognizer's shortest or least number-like match is still found (the scan does not skip it)."""
    assert f"<{entity}>" in Redactor().text(text)


def test_unchanged_records_are_not_copied() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "I was charged twice"}]}
    assert Redactor().value(message) is message
    changed = Redactor().value({**message, "name": "a@b.io"})
    assert changed["name"] == "<EMAIL>" and changed["content"] is message["content"]


def test_selection_and_structure() -> None:
    only_email = Redactor(["EMAIL"])
    assert only_email.text("a@b.io 123-45-6789") == "<EMAIL> 123-45-6789"
    assert Redactor([]).text("a@b.io") == "a@b.io"
    with pytest.raises(ValueError):
        Redactor(["NAME"])
    assert set(ENTITIES) == {"API_KEY", "EMAIL", "IBAN", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "PHONE"}
    message = {"role": "user", "content": [{"type": "text", "text": "mail a@b.io"}], "name": "a@b.io"}
    assert Redactor().value(message) == {
        "role": "user",
        "content": [{"type": "text", "text": "mail <EMAIL>"}],
        "name": "<EMAIL>",
    }


def test_proxy_stores_only_redacted_text(start_proxy: Callable[..., Proxy], teacher: str) -> None:  # noqa: F811
    proxy = start_proxy(teacher)
    api = httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {proxy.key}"})
    assert api.post("/v1/namespaces/emails-only/switches", json={"redact_entities": ["EMAIL"]}).status_code == 200
    pii = "I am jane@example.com, card 4111 1111 1111 1111, ssn 123-45-6789"
    for namespace in ("support", "emails-only"):
        reply = proxy.openai(namespace=namespace).chat.completions.create(
            model="gpt-4o", messages=[{"role": "system", "content": "from 10.0.0.7"}, {"role": "user", "content": pii}]
        )
        assert reply.choices[0].message.content == "unknown"  # the upstream saw the real text
    proxy.flush()
    by_namespace = {row.namespace: row for row in proxy.store.list_captures("acme")}
    assert by_namespace["support"].messages == [
        {"role": "system", "content": "from <IP_ADDRESS>"},
        {"role": "user", "content": "I am <EMAIL>, card <CREDIT_CARD>, ssn <US_SSN>"},
    ]
    assert by_namespace["emails-only"].messages[1]["content"] == (
        "I am <EMAIL>, card 4111 1111 1111 1111, ssn 123-45-6789"
    )
    api.close()
