"""A new capture's row: the columns the writer binds and the constants it writes, the driver-level
INSERT the capture writer runs, and a stored row read back as a `Capture`. Kept apart from the
queries since it is the layout of the table, not a query."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from operator import itemgetter
from typing import Any, NamedTuple

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import _utc, _utc_or_none
from kolm_pipeline.store.records import Capture
from kolm_pipeline.store.tables import captures
from kolm_pipeline.store.tags import split_tags

# What every new capture starts with: no triage, no feedback, no retention, distill or merge mark yet.
_NEW_CAPTURE_CONSTANTS: dict[str, str | None] = {
    "triage_state": "untriaged",
    "triaged_by": None,
    "feedback_output": None,
    "feedback_rating": None,
    "expired_at": None,
    "distilled_at": None,
    "merged_at": None,
    "implicit_signal": None,
}
_CAPTURE_COLUMNS = tuple(column.name for column in captures.columns if column.name != "id")
# What the writer binds, in the order `_capture_values` gives them; the constants above are written into its SQL.
_CAPTURE_BOUND_COLUMNS = (
    "request_id", "tenant", "namespace", "provider", "model", "input_json", "output_text", "latency_us", "status",
    "http_status", "prompt_tokens", "completion_tokens", "tags", "streamed", "created_at", "input_hmac",
    "output_hmac", "source", "retry_digest", "served_by",
)  # fmt: skip
if tuple(name for name in _CAPTURE_COLUMNS if name not in _NEW_CAPTURE_CONSTANTS) != _CAPTURE_BOUND_COLUMNS:
    raise RuntimeError("_CAPTURE_BOUND_COLUMNS no longer lists the captures table's columns in order")
# Columns a new capture often leaves empty (token counts a stream did not report; the retry digest of a
# namespace without implicit signals): where a row has None there, a variant of the INSERT writes NULL.
_OFTEN_NULL = tuple(
    _CAPTURE_BOUND_COLUMNS.index(name)
    for name in ("prompt_tokens", "completion_tokens", "retry_digest", "served_by")
)
_PROMPT_TOKENS, _COMPLETION_TOKENS, _RETRY_DIGEST, _SERVED_BY = _OFTEN_NULL
_TENANT, _NAMESPACE = _CAPTURE_BOUND_COLUMNS.index("tenant"), _CAPTURE_BOUND_COLUMNS.index("namespace")


class _Retry(NamedTuple):
    """A new capture in a namespace with implicit signals on: earlier captures of its input may be retries."""

    tenant: str
    namespace: str
    digest: str
    request_id: str
    created_at: datetime


class _DriverInsert:
    """The capture writer's INSERT … ON CONFLICT DO NOTHING in the driver's own SQL and parameter style.
    The writer inserts every proxied call, and SQLAlchemy's per-row parameter handling cost about as much as
    SQLite's insert itself.

    The columns every new capture starts alike are SQL constants, not parameters, and so is NULL where a row
    leaves one of the `_OFTEN_NULL` columns empty (a batch is one executemany per run of rows alike there):
    binding a None costs Python's sqlite3 module a formatted and discarded AttributeError (its adapter
    lookup). On SQLite the values come converted already (`prepared`: the
    boolean as 0/1, the time as SQLAlchemy writes it); elsewhere `converters` are SQLAlchemy's own."""

    def __init__(
        self,
        render: Callable[[frozenset[int]], str],
        converters: tuple[tuple[int, Callable[[Any], Any]], ...],
        prepared: bool,
    ) -> None:
        self._render = render
        self.converters = converters
        self.prepared = prepared
        self.sql = render(frozenset())
        self._variants: dict[tuple[bool, ...], tuple[str, Callable[[Any], tuple[Any, ...]] | None]] = {}

    def statements(
        self, rows: list[tuple[Any, ...]]
    ) -> list[tuple[str, list[tuple[Any, ...]], tuple[str, str]]]:
        """(SQL, parameters, (tenant, namespace)) per run of consecutive `rows` (values from
        `_capture_values`) of one namespace that leave the same columns empty: runs, not groups, so ids keep
        the order the calls came in; one namespace each, so a run's row count is what its counters gain."""
        runs: list[tuple[tuple[tuple[str, str], tuple[bool, ...]], list[tuple[Any, ...]]]] = []
        for values in rows if not self.converters else map(self._convert, rows):
            where = (values[_TENANT], values[_NAMESPACE])
            empty = (values[_PROMPT_TOKENS] is None, values[_COMPLETION_TOKENS] is None,
                     values[_RETRY_DIGEST] is None, values[_SERVED_BY] is None)
            if not runs or runs[-1][0] != (where, empty):
                runs.append(((where, empty), []))
            runs[-1][1].append(values)
        statements = []
        for (where, empty), run in runs:
            sql, kept = self._variant(empty)
            statements.append((sql, run if kept is None else list(map(kept, run)), where))
        return statements

    def _variant(self, key: tuple[bool, ...]) -> tuple[str, Callable[[Any], tuple[Any, ...]] | None]:
        variant = self._variants.get(key)
        if variant is None:
            nulls = frozenset(index for index, empty in zip(_OFTEN_NULL, key, strict=True) if empty)
            kept = itemgetter(*(index for index in range(len(_CAPTURE_BOUND_COLUMNS)) if index not in nulls))
            variant = self._variants[key] = (self._render(nulls), kept if nulls else None)
        return variant

    def _convert(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        converted = list(values)
        for index, convert in self.converters:
            if converted[index] is not None:  # these columns' processors map None to None
                converted[index] = convert(converted[index])
        return tuple(converted)


def _rows_of(values: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """`_capture_values`' tuples as rows by column name, with a new capture's constant columns."""
    return [{**dict(zip(_CAPTURE_BOUND_COLUMNS, row, strict=True)), **_NEW_CAPTURE_CONSTANTS} for row in values]


def _sql_literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    if not value.isidentifier():  # the constants are plain words; anything else would need quoting rules
        raise InvalidInput(f"not a plain word: {value!r}")
    return f"'{value}'"


def sqlite_datetime_text(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite DATETIME stores it (`YYYY-MM-DD HH:MM:SS.ffffff`, any zone dropped),
    from one C call, where SQLAlchemy's own processor formats a dict of eight fields per value."""
    return value.isoformat(" ", "microseconds")[:26]


def _capture(row: Any) -> Capture:
    return Capture(
        id=row.id,
        request_id=row.request_id,
        tenant=row.tenant,
        namespace=row.namespace,
        provider=row.provider,
        model=row.model,
        messages=json.loads(row.input_json),
        output_text=row.output_text,
        latency_us=row.latency_us,
        status=row.status,
        http_status=row.http_status,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        tags=split_tags(row.tags),
        streamed=bool(row.streamed),
        triage_state=row.triage_state,
        triaged_by=row.triaged_by,
        created_at=_utc(row.created_at),
        feedback_output=row.feedback_output,
        feedback_rating=row.feedback_rating,
        input_hmac=row.input_hmac,
        output_hmac=row.output_hmac,
        expired_at=_utc_or_none(row.expired_at),
        distilled_at=_utc_or_none(row.distilled_at),
        merged_at=_utc_or_none(row.merged_at),
        implicit_signal=row.implicit_signal,
        source=row.source,
        served_by=row.served_by,
    )
