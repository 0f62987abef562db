"""Triage rule matching: a rule's match is a dict whose every present key must hold for a capture.

`output_regex` patterns are a tenant's input that runs on every capture of its namespace, in the capture
writer and the triage asset: they run on RE2, whose matching time is linear in the text, so no pattern
(`^(a+)+$`, say) can hold a process for seconds. What RE2 cannot run (backreferences, lookaround) is refused
when the rule is added.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.tables import CAPTURE_STATUSES, RULE_ACTIONS

MATCH_KEYS = ("status", "model", "tag", "output_regex", "signal")


def validate_rule(action: str, match: dict[str, Any]) -> dict[str, str]:
    """Check a rule before it is stored; returns the match with the default status filled in."""
    if action not in RULE_ACTIONS:
        raise InvalidInput(f"invalid rule action {action!r}: expected one of {', '.join(RULE_ACTIONS)}")
    if not isinstance(match, dict):
        raise InvalidInput("rule match must be a dict")
    unknown = sorted(set(match) - set(MATCH_KEYS))
    if unknown:
        raise InvalidInput(f"unknown rule match keys {unknown}: allowed are {', '.join(MATCH_KEYS)}")
    for key, value in match.items():
        if not isinstance(value, str):
            raise InvalidInput(f"rule match value for {key!r} must be a string")
    full = {"status": "ok", **match}
    if full["status"] not in CAPTURE_STATUSES:
        raise InvalidInput(f"invalid status {full['status']!r} in rule match")
    if action == "keep" and full["status"] != "ok":
        raise InvalidInput("a keep rule can only match captures with status 'ok'")
    if "output_regex" in full:
        try:
            compile_pattern(full["output_regex"])
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise InvalidInput(f"invalid output_regex {full['output_regex']!r}: {reason} (RE2 syntax: no "
                               "backreferences or lookaround)") from None
    return full


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program of a rule's pattern, compiled once per process; raises `re2.error` if RE2 cannot run it."""
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported to its author, not to the process's stderr
    return re2.compile(pattern, options)


def _output_matches(pattern: str, output_text: str) -> bool:
    try:
        return compile_pattern(pattern).search(output_text) is not None
    except re2.error:
        return False  # a rule stored before patterns ran on RE2 that RE2 cannot run matches nothing


def rule_matches(
    match: dict[str, str], status: str, model: str, tags: list[str], output_text: str, signal: str | None = None
) -> bool:
    """True when every key present in `match` holds (status defaults to 'ok'); `signal` matches the
    implicit signal a capture got (only namespaces that opted in have any)."""
    if status != match.get("status", "ok"):
        return False
    if "model" in match and model != match["model"]:
        return False
    if "tag" in match and match["tag"] not in tags:
        return False
    if "signal" in match and match["signal"] != signal:
        return False
    return "output_regex" not in match or _output_matches(match["output_regex"], output_text)
