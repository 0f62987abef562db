"""Triage rule matching: a rule's match is a dict whose every present key must hold for a capture."""

from __future__ import annotations

import re
from typing import Any

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
            re.compile(full["output_regex"])
        except re.error as exc:
            raise InvalidInput(f"invalid output_regex: {exc}") from exc
    return full


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
    return not ("output_regex" in match and re.search(match["output_regex"], output_text) is None)
