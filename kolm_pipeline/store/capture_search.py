"""Finding captures: the one query behind `kolm capture list|export` and the inbox's dataset view.

Every filter is SQL (state, status, model, tag, a time window, a text search), so a page costs what the
page holds and an export streams in id order without loading the namespace. The text search is a
case-insensitive substring match (`lower(…) LIKE lower(…)`, which SQLite and PostgreSQL both run) on what a
person reads: the conversation as stored (JSON, so the search text is also tried JSON-escaped), the
teacher's output and any correction. Captures past their retention window have no text left to match.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, String, func, literal, or_, select

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase
from kolm_pipeline.store.capture_rows import _capture
from kolm_pipeline.store.namespaces import validate_namespace
from kolm_pipeline.store.records import Capture
from kolm_pipeline.store.tables import CAPTURE_STATUSES, TRIAGE_STATES, captures
from kolm_pipeline.store.tags import validate_tags

SEARCH_MAX_LENGTH = 200
_PAGE = 500


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 date or time (`2025-06-01`, `2025-06-01T09:30`, `…Z`, `…+02:00`) as UTC; without an offset
    it is read as UTC. `what` names the flag or field in the error."""
    try:
        value = datetime.fromisoformat(text.strip())
    except (AttributeError, ValueError):
        raise InvalidInput(f"{what}: {text!r} is not an ISO 8601 date or time (e.g. 2025-06-01 or "
                           "2025-06-01T09:30:00Z)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class CaptureFilter:
    """Which captures: all of the tenant's, narrowed by every field given. `since` is inclusive, `until`
    exclusive; `tag` matches one whole tag; `search` a substring of the conversation, output or correction."""

    namespace: str | None = None
    state: str | None = None
    status: str | None = None
    model: str | None = None
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None

    def __post_init__(self) -> None:
        if self.namespace is not None:
            validate_namespace(self.namespace)
        if self.state is not None and self.state not in TRIAGE_STATES:
            raise InvalidInput(f"state: {self.state!r} is not one of {', '.join(TRIAGE_STATES)}")
        if self.status is not None and self.status not in CAPTURE_STATUSES:
            raise InvalidInput(f"status: {self.status!r} is not one of {', '.join(CAPTURE_STATUSES)}")
        if self.tag is not None:
            validate_tags([self.tag])
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise InvalidInput(f"{name}: a time with its UTC offset is needed")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InvalidInput(f"since ({self.since.isoformat()}) must be before until ({self.until.isoformat()})")
        if self.search is not None and not (0 < len(self.search) <= SEARCH_MAX_LENGTH and self.search.strip()):
            raise InvalidInput(f"search: give 1-{SEARCH_MAX_LENGTH} characters of text")

    def statement(self, tenant: str) -> Select:
        """The tenant's captures matching this filter (unordered)."""
        c = captures.c
        stmt = select(captures).where(c.tenant == tenant)
        for column, value in ((c.namespace, self.namespace), (c.triage_state, self.state), (c.status, self.status),
                              (c.model, self.model)):
            if value is not None:
                stmt = stmt.where(column == value)
        if self.tag is not None:  # the column is a comma list: match one whole item
            listed = literal(",", String) + c.tags + literal(",", String)
            stmt = stmt.where(listed.contains(f",{self.tag},", autoescape=True))
        if self.since is not None:
            stmt = stmt.where(c.created_at >= self.since)
        if self.until is not None:
            stmt = stmt.where(c.created_at < self.until)
        if self.search is not None:
            escaped = json.dumps(self.search, ensure_ascii=False)[1:-1]  # as the text sits inside stored JSON
            found = [column.icontains(self.search, autoescape=True)
                     for column in (c.input_json, c.output_text, c.feedback_output)]
            if escaped != self.search:
                found.append(c.input_json.icontains(escaped, autoescape=True))
            stmt = stmt.where(c.expired_at.is_(None), or_(*found))
        return stmt


@dataclass(frozen=True)
class CapturePage:
    """One page of captures, newest first, and how many match in all."""

    captures: list[Capture]
    total: int
    limit: int
    offset: int


def capture_dict(capture: Capture) -> dict[str, Any]:
    """A capture as JSON: what the inbox API answers, `kolm capture list --json` prints and a JSONL export holds."""
    data = asdict(capture)
    for name in ("created_at", "expired_at", "distilled_at", "merged_at"):
        value = getattr(capture, name)
        data[name] = value.isoformat() if value is not None else None
    return data


class CaptureSearchQueries(StoreBase):
    """Listing, counting and streaming a tenant's captures by a `CaptureFilter`."""

    def find_captures(self, tenant: str, where: CaptureFilter, limit: int = 100, offset: int = 0) -> CapturePage:
        """One page of the matching captures, newest first, with the number that match in all."""
        if limit < 1 or offset < 0:
            raise InvalidInput("limit must be at least 1 and offset not negative")
        stmt = where.statement(tenant)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
            rows = conn.execute(stmt.order_by(captures.c.id.desc()).limit(limit).offset(offset)).all()
        return CapturePage([_capture(row) for row in rows], total, limit, offset)

    def select_captures(self, tenant: str, where: CaptureFilter, limit: int = 100, offset: int = 0) -> list[Capture]:
        """The matching captures, newest first, without counting them all."""
        if limit < 0 or offset < 0:
            raise InvalidInput("limit and offset must not be negative")
        stmt = where.statement(tenant).order_by(captures.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_capture(row) for row in conn.execute(stmt)]

    def iter_captures(self, tenant: str, where: CaptureFilter, limit: int | None = None) -> Iterator[Capture]:
        """Every matching capture (at most `limit`), newest first, read a page at a time by id: an export of a
        large namespace never holds more than one page."""
        if limit is not None and limit < 1:
            raise InvalidInput("limit must be at least 1")
        left = limit
        before: int | None = None
        while left is None or left > 0:
            stmt = where.statement(tenant)
            if before is not None:
                stmt = stmt.where(captures.c.id < before)
            size = _PAGE if left is None else min(_PAGE, left)
            with self.engine.connect() as conn:
                rows = conn.execute(stmt.order_by(captures.c.id.desc()).limit(size)).all()
            for row in rows:
                yield _capture(row)
            if len(rows) < size:
                return
            before = rows[-1].id
            if left is not None:
                left -= len(rows)
