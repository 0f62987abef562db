"""The inbox API and page: listing captures, triage (one by one, in bulk, by rule), feedback, the namespace
switches and status, the audit log and the `/inbox` page. Mounted by the capture server; every route needs a
full kolm key (a capture-only key may record, not read or triage) and sees only its tenant's captures.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, model_validator

from kolm_pipeline.capture.corrections import record_correction
from kolm_pipeline.capture.forward import MAX_TAG_LENGTH, MAX_TAGS, ApiError, KeyCache, parse_namespace
from kolm_pipeline.capture.redact import validate_entities
from kolm_pipeline.store import CaptureFilter, CaptureStore, Tenant, capture_dict, parse_time, partition_key
from kolm_pipeline.store.capture_search import SEARCH_MAX_LENGTH
from kolm_pipeline.store.rules import MATCH_KEYS

INBOX_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter()


def store_of(request: Request) -> CaptureStore:
    """The capture store the server was created with."""
    return request.app.state.store


StoreDep = Annotated[CaptureStore, Depends(store_of)]


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found_error", what)


async def tenant_of(request: Request) -> Tenant:
    """The tenant whose kolm key the request carries; 401 when there is none or it is unknown."""
    keys: KeyCache = request.app.state.keys
    return await keys.tenant_of(request.headers)


async def inbox_tenant(request: Request) -> Tenant:
    """Like `tenant_of`, but capture-only keys are refused (403): they may record, not read or triage."""
    tenant = await tenant_of(request)
    if tenant.capture_only:
        raise ApiError(403, "permission_error", "this kolm key can only capture; the inbox needs a full key")
    return tenant


InboxTenant = Annotated[Tenant, Depends(inbox_tenant)]


class TriageBody(BaseModel):
    """`tags` are added and `remove_tags` removed with the state change, e.g. `["eval-candidate"]`."""

    state: Literal["kept", "discarded", "untriaged"]
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    remove_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)


class BulkTriageBody(BaseModel):
    ids: list[int] = Field(min_length=1, max_length=10_000)
    state: Literal["kept", "discarded", "untriaged"]


class FeedbackBody(BaseModel):
    output: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    rating: int | None = Field(default=None, ge=1, le=5, strict=True)

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackBody:
        if self.output is None and self.rating is None:
            raise ValueError("give a corrected 'output', a 'rating' from 1 to 5, or both")
        if self.output is not None and not self.output.strip():
            raise ValueError("the corrected 'output' is blank")
        return self


class RuleBody(BaseModel):
    action: Literal["keep", "discard"]
    match: dict[str, str] = Field(default_factory=dict)


class SwitchesBody(BaseModel):
    retention_days: int | None = Field(default=None, ge=1, le=3650, strict=True)
    implicit_signals: bool | None = Field(default=None, strict=True)
    distill_ready: bool | None = Field(default=None, strict=True)
    redact_entities: list[str] | None = None
    routing: Literal["teacher", "shadow", "student"] | None = None
    routing_target: float | None = Field(default=None, gt=0, lt=1)
    canary_share: float | None = Field(default=None, ge=0, lt=1)
    shadow_min: int | None = Field(default=None, ge=1, le=5000, strict=True)


def _actor(tenant: Tenant) -> str:
    """Who did it, as the audit log names it: the key's public id (`kolm tenant keys` lists it)."""
    return f"key:{tenant.key_id or tenant.key_prefix}"


def _ns(namespace: str | None) -> str | None:
    return None if namespace is None else parse_namespace(namespace)

@router.get("/v1/namespaces")
async def list_namespaces(tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    pairs = await asyncio.to_thread(store.namespaces, tenant.name)
    return {"namespaces": [namespace for _, namespace in pairs]}

@router.get("/v1/captures")
async def list_captures(
    tenant: InboxTenant,
    store: StoreDep,
    namespace: str | None = None,
    state: Literal["untriaged", "kept", "discarded"] | None = None,
    status: Literal["ok", "error", "incomplete"] | None = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
    tag: Annotated[str | None, Query(max_length=MAX_TAG_LENGTH)] = None,
    since: Annotated[str | None, Query(max_length=64)] = None,
    until: Annotated[str | None, Query(max_length=64)] = None,
    search: Annotated[str | None, Query(max_length=SEARCH_MAX_LENGTH)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    """A page of captures, newest first, with `total` matching: the same filters as `kolm capture list`."""
    try:
        where = CaptureFilter(
            namespace=_ns(namespace), state=state, status=status, model=model, tag=tag or None,
            since=parse_time(since, "since") if since else None, until=parse_time(until, "until") if until else None,
            search=search or None,
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from exc
    page = await asyncio.to_thread(store.find_captures, tenant.name, where, limit, offset)
    return {"captures": [capture_dict(row) for row in page.captures], "total": page.total, "limit": limit,
            "offset": offset}

@router.get("/v1/captures/{capture_id}")
async def get_capture(capture_id: int, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    capture = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
    if capture is None:
        raise not_found(f"no capture {capture_id}")
    return capture_dict(capture)

@router.post("/v1/captures/triage")
async def triage_bulk(body: BulkTriageBody, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    owned = await asyncio.to_thread(store.owned_ids, tenant.name, body.ids)
    missing = sorted(set(body.ids) - owned)
    if missing:
        raise not_found(f"no capture(s) {missing[:20]}; nothing was changed")
    changed = await asyncio.to_thread(store.set_triage, tenant.name, body.ids, body.state, _actor(tenant))
    return {"state": body.state, "changed": changed, "requested": len(set(body.ids))}

@router.post("/v1/captures/{capture_id}/triage")
async def triage(capture_id: int, body: TriageBody, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    capture = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
    if capture is None:
        raise not_found(f"no capture {capture_id}")
    if body.state == "kept" and (capture.status != "ok" or capture.expired_at is not None):
        reason = f"has status {capture.status!r}" if capture.status != "ok" else "is past its retention window"
        raise ApiError(409, "conflict_error", f"capture {capture_id} {reason}; it cannot be kept")
    try:
        await asyncio.to_thread(
            store.set_triage, tenant.name, [capture_id], body.state, _actor(tenant), body.tags, body.remove_tags
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from exc
    if not body.tags and not body.remove_tags:
        return {"id": capture_id, "triage_state": body.state}
    updated = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
    return {"id": capture_id, "triage_state": body.state, "tags": updated.tags if updated else capture.tags}

@router.post("/v1/captures/{capture_id}/feedback")
async def feedback(capture_id: int, body: FeedbackBody, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    """A correction (redacted as the namespace redacts captures) and/or a rating, recorded with the key's id."""
    output = body.output
    try:
        if output is not None:
            correction = await asyncio.to_thread(
                record_correction, store, tenant.name, capture_id, output, _actor(tenant), body.rating
            )
            output = correction.output
        else:
            await asyncio.to_thread(store.set_feedback, tenant.name, capture_id, None, _actor(tenant), body.rating)
    except LookupError as exc:
        raise not_found(f"no capture {capture_id}") from exc
    except ValueError as exc:
        raise ApiError(409, "conflict_error", str(exc)) from exc
    return {"id": capture_id, "feedback_output": output, "feedback_rating": body.rating}

@router.get("/v1/namespaces/{namespace}/rules")
async def list_rules(namespace: str, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    rules = await asyncio.to_thread(store.rules, tenant.name, parse_namespace(namespace))
    return {
        "rules": [{"id": r.id, "action": r.action, "match": r.match, "created_by": r.created_by} for r in rules]
    }

@router.post("/v1/namespaces/{namespace}/rules")
async def add_rule(namespace: str, body: RuleBody, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    namespace = parse_namespace(namespace)
    try:
        rule_id = await asyncio.to_thread(
            store.add_rule, tenant.name, namespace, body.action, body.match, _actor(tenant)
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", f"{exc} (match keys: {', '.join(MATCH_KEYS)})") from exc
    applied = await asyncio.to_thread(store.apply_rules, tenant.name, namespace)
    return {"id": rule_id, "applied": applied}

@router.post("/v1/namespaces/{namespace}/rules/apply")
async def apply_rules(namespace: str, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    return {"applied": await asyncio.to_thread(store.apply_rules, tenant.name, parse_namespace(namespace))}

def _price_table(request: Request) -> dict[str, tuple[float, float]]:
    return request.app.state.settings.price_table


@router.get("/v1/namespaces/{namespace}/status")
async def status(namespace: str, tenant: InboxTenant, store: StoreDep, request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(store.status, tenant.name, parse_namespace(namespace), _price_table(request))


@router.get("/v1/namespaces/{namespace}/disagreements")
async def disagreements(namespace: str, tenant: InboxTenant, store: StoreDep,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Requests where the deployed adapter's answer differed from the teacher's (routing `shadow` or
    `student`), newest first: candidates for triage, each with its capture id."""
    rows = await asyncio.to_thread(store.disagreements, tenant.name, parse_namespace(namespace), limit)
    return {"disagreements": rows}

@router.post("/v1/namespaces/{namespace}/switches")
async def switches(namespace: str, body: SwitchesBody, tenant: InboxTenant, store: StoreDep,
                   request: Request) -> dict[str, Any]:
    namespace = parse_namespace(namespace)
    changes = body.model_dump(exclude_unset=True)
    if "redact_entities" in changes:
        try:
            changes["redact_entities"] = validate_entities(changes["redact_entities"])
        except ValueError as exc:
            raise ApiError(400, "invalid_request_error", str(exc)) from exc
    changes = {k: v for k, v in changes.items() if v is not None or k == "redact_entities"}
    await asyncio.to_thread(store.set_switches, tenant.name, namespace, _actor(tenant), **changes)
    return await asyncio.to_thread(store.status, tenant.name, namespace, _price_table(request))

@router.get("/v1/audit")
async def audit(tenant: InboxTenant, store: StoreDep, namespace: str | None = None) -> dict[str, Any]:
    rows = await asyncio.to_thread(store.audit_rows, tenant.name, _ns(namespace))
    return {
        "audit": [
            {
                "id": r.id,
                "namespace": r.namespace,
                "action": r.action,
                "detail": r.detail,
                "actor": r.actor,
                "created_at": r.created_at.isoformat(),
            }
            for r in rows[:1000]
        ]
    }

@router.get("/v1/bridges/observations")
async def observations(namespace: str, tenant: InboxTenant, store: StoreDep) -> dict[str, Any]:
    namespace = parse_namespace(namespace)
    observed = await asyncio.to_thread(store.observation, tenant.name, namespace)
    return {"namespace": namespace, "partition_key": partition_key(tenant.name, namespace), **observed}

_page_files = resources.files("kolm_pipeline.capture")
_INBOX_HTML = _page_files.joinpath("inbox.html").read_text("utf-8")
_INBOX_JS = _page_files.joinpath("inbox.js").read_text("utf-8")
_PAGE_HEADERS = {
    "content-security-policy": INBOX_CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

@router.get("/inbox", response_class=HTMLResponse)
async def inbox() -> HTMLResponse:
    """The page holds no data: its script reads the JSON API with the key the person types in."""
    return HTMLResponse(_INBOX_HTML, headers=_PAGE_HEADERS)

@router.get("/inbox.js")
async def inbox_script() -> Response:
    return Response(_INBOX_JS, media_type="text/javascript", headers=_PAGE_HEADERS)
