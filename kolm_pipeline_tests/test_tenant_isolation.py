"""Tenant isolation as a stateful property: three tenants with two namespaces each capture, triage, give
feedback and read through the real proxy in random interleavings. No route and no CLI command ever
returns another tenant's capture, corpus line or counter; another tenant's ids answer 404, not 403; a
capture-only key that tries to read gets 403."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kolm_pipeline import cli
from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture_server import CAPTURE_ID_HEADER, create_app
from kolm_pipeline.demo.teacher import create_teacher_app
from kolm_pipeline.settings import CaptureConfig, load_settings
from kolm_pipeline.store import CaptureStore

NAMESPACES = ("alpha", "beta")
READ_ROUTES = [
    ("GET", "/v1/captures"),
    ("GET", "/v1/namespaces"),
    ("GET", "/v1/namespaces/alpha/status"),
    ("GET", "/v1/labels/synthesize-corpus?namespace=alpha"),
    ("GET", "/v1/bridges/observations?namespace=alpha"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/captures/1/triage"),
    ("POST", "/v1/namespaces/alpha/switches"),
]


@dataclasses.dataclass
class World:
    url: str
    home: Path
    app: object
    store: CaptureStore
    http: httpx.Client
    runs: Iterator[int]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("isolation") / "home"
    teacher = BackgroundServer(create_teacher_app({"good question": "good answer"}))
    settings_ = load_settings(home).model_copy(update={"upstream_openai": f"{teacher.url}/v1"})
    store = CaptureStore(settings_.store_url)
    app = create_app(settings_, store, CaptureConfig(retention_sweep_s=0))
    with BackgroundServer(app) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as http:
        yield World(proxy.url, home, app, store, http, itertools.count())
    teacher.stop()
    store.close()


class Isolation(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        run = next(self.world.runs)
        self.tenants = [f"t{run}x{i}" for i in range(3)]
        self.keys = {t: self.world.store.create_tenant(t) for t in self.tenants}
        self.capture_keys = {t: self.world.store.create_tenant_key(f"{t}c", capture_only=True) for t in self.tenants}
        self.owner: dict[int, tuple[str, str]] = {}  # capture id -> (tenant, namespace)
        self.state: dict[int, str] = {}
        self.serial = itertools.count()

    def auth(self, tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}

    def ids(self) -> list[int]:
        return sorted(self.owner)

    @rule(who=st.integers(0, 2), ns=st.sampled_from(NAMESPACES), capture_only=st.booleans())
    def capture(self, who: int, ns: str, capture_only: bool) -> None:
        tenant = self.tenants[who]
        key = self.capture_keys[tenant] if capture_only else self.keys[tenant]
        writer = f"{tenant}c" if capture_only else tenant
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{next(self.serial)}"}]}
        headers = {"authorization": f"Bearer {key}", "x-kolm-namespace": ns, "x-upstream-api-key": "k"}
        resp = self.world.http.post("/v1/capture/openai/chat/completions", json=body, headers=headers)
        assert resp.status_code == 200
        self.world.app.state.recorder.flush_threadsafe()
        request_id = resp.headers[CAPTURE_ID_HEADER]
        [row] = [c for c in self.world.store.list_captures(writer, ns, limit=1000) if c.request_id == request_id]
        if not capture_only:
            self.owner[row.id] = (tenant, ns)
            self.state[row.id] = "untriaged"

    @rule(who=st.integers(0, 2), pick=st.integers(0, 10_000), state=st.sampled_from(["kept", "discarded"]))
    def triage(self, who: int, pick: int, state: str) -> None:
        if not self.owner:
            return
        capture_id = self.ids()[pick % len(self.owner)]
        actor = self.tenants[who]
        resp = self.world.http.post(
            f"/v1/captures/{capture_id}/triage", json={"state": state}, headers=self.auth(actor)
        )
        if self.owner[capture_id][0] == actor:
            assert resp.status_code == 200
            self.state[capture_id] = state
        else:
            assert resp.status_code == 404, resp.text
        bulk = self.world.http.post(
            "/v1/captures/triage", json={"ids": [capture_id], "state": state}, headers=self.auth(actor)
        )
        assert bulk.status_code == (200 if self.owner[capture_id][0] == actor else 404)

    @rule(who=st.integers(0, 2), pick=st.integers(0, 10_000))
    def touch_by_id(self, who: int, pick: int) -> None:
        if not self.owner:
            return
        capture_id = self.ids()[pick % len(self.owner)]
        actor = self.tenants[who]
        own = self.owner[capture_id][0] == actor
        got = self.world.http.get(f"/v1/captures/{capture_id}", headers=self.auth(actor))
        assert got.status_code == (200 if own else 404)
        fed = self.world.http.post(f"/v1/captures/{capture_id}/feedback", json={"rating": 3}, headers=self.auth(actor))
        assert fed.status_code == (200 if own else 404)
        assert (
            self.world.http.get(f"/v1/captures/{capture_id + 10_000_000}", headers=self.auth(actor)).status_code == 404
        )

    @rule(who=st.integers(0, 2), route=st.sampled_from(READ_ROUTES))
    def capture_only_key_cannot_read(self, who: int, route: tuple[str, str]) -> None:
        method, path = route
        headers = {"authorization": f"Bearer {self.capture_keys[self.tenants[who]]}"}
        resp = self.world.http.request(method, path, headers=headers, json={"state": "kept"})
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"

    @invariant()
    def every_view_is_the_tenants_own(self) -> None:
        for tenant in self.tenants:
            mine = {i for i, (owner, _) in self.owner.items() if owner == tenant}
            listed = self.world.http.get("/v1/captures", params={"limit": 1000}, headers=self.auth(tenant)).json()
            assert {c["id"] for c in listed["captures"]} == mine
            assert {c["tenant"] for c in listed["captures"]} <= {tenant}
            namespaces = self.world.http.get("/v1/namespaces", headers=self.auth(tenant)).json()["namespaces"]
            assert set(namespaces) == {self.owner[i][1] for i in mine}
            for ns in NAMESPACES:
                in_ns = [i for i in mine if self.owner[i][1] == ns]
                kept = sorted(i for i in in_ns if self.state[i] == "kept")
                expected = {
                    "captured": len(in_ns),
                    "kept": len(kept),
                    "discarded": sum(self.state[i] == "discarded" for i in in_ns),
                    "untriaged": sum(self.state[i] == "untriaged" for i in in_ns),
                    "distilled": 0,
                    "merged": 0,
                }
                status = self.world.http.get(f"/v1/namespaces/{ns}/status", headers=self.auth(tenant)).json()
                assert status["counters"] == expected
                observed = self.world.http.get(
                    "/v1/bridges/observations", params={"namespace": ns}, headers=self.auth(tenant)
                ).json()
                assert observed["counters"] == expected and observed["partition_key"] == f"{tenant}.{ns}"
                corpus = self.world.http.get(
                    "/v1/labels/synthesize-corpus", params={"namespace": ns}, headers=self.auth(tenant)
                )
                assert [json.loads(line)["meta"]["capture_id"] for line in corpus.text.splitlines()] == kept
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    code = cli.main(
                        ["--home", str(self.world.home), "capture", "status", "--namespace", f"{tenant}.{ns}",
                         "--json"]
                    )
                assert code == 0 and json.loads(out.getvalue())["counters"] == expected


def test_tenants_never_see_each_other(world: World) -> None:
    Isolation.world = world
    run_state_machine_as_test(
        Isolation,
        settings=settings(
            max_examples=6,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
