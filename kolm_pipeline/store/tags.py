"""Tags as the captures table stores them, a comma list: the check every writer of tags runs, and the tag
that holds a capture out for evaluation. Apart from the queries since the importer and the CLI use them too."""

from __future__ import annotations

from collections.abc import Iterable

from kolm_pipeline.provenance.errors import InvalidInput

TAG_MAX_LENGTH = 64
# Captures tagged so (at capture with `x-kolm-tags`, or at triage) are held out for evaluation: never trained on.
EVAL_CANDIDATE_TAG = "eval-candidate"


def split_tags(text: str) -> list[str]:
    """The stored comma list as tags; empty items dropped."""
    return [tag for tag in text.split(",") if tag]


def validate_tags(tags: Iterable[str], what: str = "tag") -> list[str]:
    """Tags as stored: printable, no commas (the column is a comma list), at most 64 characters; duplicates
    dropped, order kept."""
    found: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or len(tag) > TAG_MAX_LENGTH or "," in tag or not tag.isprintable():
            raise InvalidInput(f"invalid {what} {tag!r}: 1-{TAG_MAX_LENGTH} printable characters, no commas")
        if tag not in found:
            found.append(tag)
    return found
