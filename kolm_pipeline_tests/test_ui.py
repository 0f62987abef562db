"""The Dagster UI on the project's workspace: a real `dagster-webserver` on a test instance, asked through
GraphQL for the loop's assets, checks, sensors and schedule; a materialization launched through GraphQL
for a `kolm_namespace` partition runs to success; and the asset graph page renders the assets in a real
headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml

from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.conftest import capture_tickets
from kolm_pipeline_tests.test_inbox_browser import Browser, browser  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = REPO / "workspace.yaml"
LOOP_ASSETS = ["triaged_captures", "corpus", "recipe", "adapter", "evaluation", "deployment"]
PARTITION = "acme.support"
#: The webserver runs each launched run in a subprocess of the code server (DefaultRunLauncher) right away:
#: no daemon, so not the default QueuedRunCoordinator.
TEST_INSTANCE = {
    "telemetry": {"enabled": False},
    "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
    "run_launcher": {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"},
}
STARTUP_TIMEOUT_S = 240


@dataclass
class Webserver:
    url: str
    home: Path
    location: str
    repository: str
    log: Path

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        reply = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        reply.raise_for_status()
        body = reply.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def selector(self) -> dict[str, str]:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository}


LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message }
    ... on RepositoryLocation { repositories { name } } } } } } }"""


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def _wait_for_location(url: str, process: subprocess.Popen, log: Path) -> tuple[str, str]:
    """(location, repository) once the webserver answers and the code location has loaded."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            reply = httpx.post(f"{url}/graphql", json={"query": LOCATIONS}, timeout=10).json()
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        entries = reply["data"]["workspaceOrError"].get("locationEntries") or []
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            (entry,) = entries
            loaded = entry["locationOrLoadError"]
            assert loaded["__typename"] == "RepositoryLocation", loaded
            return entry["name"], loaded["repositories"][0]["name"]
        time.sleep(0.5)
    pytest.fail(f"the code location did not load in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def webserver(tmp_path_factory) -> Iterator[Webserver]:
    """dagster-webserver on the project's workspace.yaml, with KOLM_HOME and DAGSTER_HOME in a temporary
    directory (never the repository's .kolm), and 160 ticket captures kept by a rule in `acme.support`."""
    home = tmp_path_factory.mktemp("ui") / "kolm-home"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(TEST_INSTANCE))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KOLM_", "DAGSTER_")) or key == "KOLM_MODEL_CACHE"}
    env.update(KOLM_HOME=str(home), DAGSTER_HOME=str(dagster_home), HF_HUB_OFFLINE="1")

    settings = load_settings(home)
    store = CaptureStore(f"sqlite:///{home / 'captures.db'}")
    capture_tickets(store, "acme", "support", generate_tickets(160, seed=11))
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    assert settings.store_url == f"sqlite:///{home / 'captures.db'}"

    port = _free_port()
    log = home / "webserver.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-webserver")), "-h", "127.0.0.1", "-p", str(port),
             "-w", str(WORKSPACE)],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        location, repository = _wait_for_location(url, process, log)
        yield Webserver(url, home, location, repository, log)
    finally:
        # The webserver's session also holds the code server and any run worker it started.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


DEFINITIONS = """query ($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) { __typename ... on Repository {
    sensors { name sensorState { status } }
    schedules { name cronSchedule scheduleState { status } }
    assetNodes { assetKey { path } groupName isPartitioned
      assetChecksOrError { __typename ... on AssetChecks { checks { name blocking } } } } } } }"""

ADD_PARTITION = """mutation ($selector: RepositorySelector!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: "kolm_namespace", partitionKey: $key) {
    __typename ... on AddDynamicPartitionSuccess { partitionKey } ... on PythonError { message } } }"""

LAUNCH = """mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""

RUN = """query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { status tags { key value } } } }"""

FAILURES = """query ($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection {
  events { __typename ... on MessageEvent { message } ... on ExecutionStepFailureEvent { error { message } } } } } }"""


def test_graphql_lists_the_loop_and_runs_a_launched_materialization(webserver: Webserver):
    repository = webserver.graphql(DEFINITIONS, selector=webserver.selector())["repositoryOrError"]
    assert repository["__typename"] == "Repository", repository
    nodes = {"/".join(node["assetKey"]["path"]): node for node in repository["assetNodes"]}
    assert set(LOOP_ASSETS) <= set(nodes)
    assert all(nodes[name]["isPartitioned"] and nodes[name]["groupName"] == "kolm_loop" for name in LOOP_ASSETS)
    checks = {check["name"]: check["blocking"] for node in nodes.values()
              for check in node["assetChecksOrError"].get("checks", [])}
    assert checks["k_gate"] is True and checks["collapse_tripwire"] is True  # both blocking
    # Automation ships STOPPED: distillation is operator-gated.
    sensors = {sensor["name"]: sensor["sensorState"]["status"] for sensor in repository["sensors"]}
    assert {"namespace_discovery_sensor", "volume_sensor"} <= set(sensors)
    assert set(sensors.values()) == {"STOPPED"}
    schedules = {s["name"]: (s["cronSchedule"], s["scheduleState"]["status"]) for s in repository["schedules"]}
    assert schedules["nightly_distill"] == ("0 2 * * *", "STOPPED")
    assert {status for _, status in schedules.values()} == {"STOPPED"}

    added = webserver.graphql(ADD_PARTITION, selector=webserver.selector(), key=PARTITION)["addDynamicPartition"]
    assert added == {"__typename": "AddDynamicPartitionSuccess", "partitionKey": PARTITION}

    params = {
        "selector": {
            **webserver.selector(),
            "jobName": "distill",
            "assetSelection": [{"path": ["triaged_captures"]}, {"path": ["corpus"]}],
            "assetCheckSelection": [],
        },
        "runConfigData": {"ops": {"corpus": {"config": {"min_pairs": 100}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": PARTITION}]},
    }
    launched = webserver.graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + 180
    status = None
    while time.monotonic() < deadline:
        status = webserver.graphql(RUN, runId=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1)
    if status != "SUCCESS":
        events = webserver.graphql(FAILURES, runId=run_id)["logsForRun"].get("events", [])
        pytest.fail(f"run {run_id} ended {status}: " + "\n".join(
            (e.get("error") or {}).get("message") or e.get("message", "") for e in events[-15:]))

    # The run wrote to the test's own instance and store: the kept counter is the 160 captures.
    instance = dg.DagsterInstance.from_config(str(webserver.home / "dagster"))
    try:
        materialized = {}
        for name in ("triaged_captures", "corpus"):
            event = instance.get_latest_materialization_event(dg.AssetKey(name))
            assert event is not None and event.run_id == run_id, name
            materialized[name] = event.asset_materialization
        assert all(m.partition == PARTITION for m in materialized.values())
        assert materialized["triaged_captures"].metadata["counter_kept"].value == 160
        assert materialized["corpus"].metadata["corpus_cid"].value.startswith("bafkrei")
        assert instance.get_latest_materialization_event(dg.AssetKey("adapter")) is None
    finally:
        instance.dispose()
    assert (webserver.home / "work" / PARTITION / "corpus.jsonl").is_file()


def test_asset_graph_renders_in_chromium(webserver: Webserver, browser: Browser, tmp_path):  # noqa: F811
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{webserver.url}/asset-groups")
    # Graph nodes are HTML inside the SVG's <foreignObject>s; the sidebar lists the names too, so look there.
    nodes = "Array.from(document.querySelectorAll('svg foreignObject')).map(node => node.textContent.trim())"
    names = json.dumps(LOOP_ASSETS)
    browser.wait_for(f"{names}.every(name => {nodes}.includes(name))", timeout=120)
    assert set(LOOP_ASSETS) <= set(browser.eval(nodes))
    assert "Global asset lineage" in browser.eval("document.body.innerText")

    screenshot = tmp_path / "asset-graph.png"
    screenshot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    shot = os.environ.get("KOLM_UI_SCREENSHOT")
    if shot:
        Path(shot).write_bytes(screenshot.read_bytes())
