"""Routing at the capture endpoint on the demo task: how far the distilled adapter agrees with the teacher on live
traffic, how much of it the student answers at the agreement target, what that saves, and what each mode costs
in latency through the proxy.

    .venv/bin/python bench/routing.py                   # runs the demo first (≈2 min), 200 requests per mode
    .venv/bin/python bench/routing.py --home DIR --reuse  # a home where `kolm demo` already deployed demo.support
    .venv/bin/python bench/routing.py --requests 100 --pace 0.5 --json-out routing.json

What it does: `kolm demo` (unless `--reuse`) distills and deploys an adapter for demo.support; `kolm serve` starts
as its own process on that home; the stand-in teacher (the demo's: it answers each ticket's queue, after
`--teacher-latency` seconds) sits behind the capture proxy (in this process). Fresh demo tickets (another seed
than the demo's training traffic) go through the proxy with the openai SDK, one at a time:

1. `teacher` and `shadow` rounds interleaved (`--requests` each): p50 through the proxy in both, so the
   difference is what shadowing adds to the response path; the shadow round's requests are compared.
2. `student` (target `--target`, canary share `--canary`): the same number of other tickets; the share the student
   answered, its answers' agreement with the teacher's, escalations, p50, dollars avoided per 1,000 requests
   (the price table's default price for the stand-in model's token counts).

Each request is followed by `--pace` seconds of quiet in every mode, so the student's shadow answer (a forward pass
of the base model on a shared 2-core machine) does not land on the next request's timing: in production the serving
runtime runs on its own host. Run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import openai  # noqa: E402

from kolm_pipeline.capture.background import BackgroundServer  # noqa: E402
from kolm_pipeline.capture_server import create_app  # noqa: E402
from kolm_pipeline.demo.run import DEMO_NAMESPACE, DEMO_TENANT, TEACHER_MODEL, run_demo  # noqa: E402
from kolm_pipeline.demo.teacher import create_teacher_app  # noqa: E402
from kolm_pipeline.demo.tickets import generate_tickets  # noqa: E402
from kolm_pipeline.settings import CaptureConfig, load_settings  # noqa: E402
from kolm_pipeline.store import CaptureStore  # noqa: E402

UPSTREAM_KEY = "bench-upstream-key-not-a-secret"


class _Done(Exception):
    """The run ends early: student routing was refused (the figures say why)."""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "KOLM_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-m", "kolm_pipeline.cli", "serve", "--port", str(port),
                                "--no-live-monitor", "--log-level", "warning"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit("kolm serve exited before it was ready")
        time.sleep(0.5)
    process.kill()
    raise SystemExit("kolm serve did not start within 300 s")


def ask(client: openai.OpenAI, ticket) -> tuple[str, str, float]:
    began = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=TEACHER_MODEL, messages=ticket.messages())
    seconds = time.perf_counter() - began
    return raw.parse().choices[0].message.content or "", raw.headers.get("x-kolm-served-by", "teacher"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="KOLM_HOME to use (default: a fresh temporary one)")
    parser.add_argument("--reuse", action="store_true", help="demo.support is already deployed in --home")
    parser.add_argument("--requests", type=int, default=200, help="requests per mode")
    parser.add_argument("--pace", type=float, default=0.4, help="seconds of quiet after each request")
    parser.add_argument("--teacher-latency", type=float, default=0.0, help="the stand-in teacher's delay (s)")
    parser.add_argument("--target", type=float, default=0.98, help="agreement target of the student's answers")
    parser.add_argument("--canary", type=float, default=0.05, help="canary share in student mode")
    parser.add_argument("--json-out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="kolm-bench-routing-"))
    os.environ["KOLM_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    settings = load_settings(home)
    if not args.reuse:
        print("running the demo (distill and deploy demo.support)…", flush=True)
        report = run_demo(settings, log=lambda line: print("  " + line, flush=True))
        if not report.artifact_cid:
            raise SystemExit(f"the demo deployed nothing: {report.failures}")
    store = CaptureStore(settings.store_url)
    if args.reuse:  # fresh traffic: an earlier run's captures and comparisons would count in the figures
        store.delete_namespace(DEMO_TENANT, DEMO_NAMESPACE, actor="bench")
    key = store.create_tenant_key(DEMO_TENANT, actor="bench")
    tickets = generate_tickets(3 * args.requests, seed=2026)
    answers = {ticket.text: ticket.queue for ticket in tickets}
    serve, serve_url = start_serve(home)
    figures: dict = {"requests_per_mode": args.requests, "pace_s": args.pace, "teacher_latency_s": args.teacher_latency}
    try:
        with BackgroundServer(create_teacher_app(answers, latency_s=args.teacher_latency)) as teacher:
            proxy_settings = settings.model_copy(update={"upstream_openai": f"{teacher.url}/v1",
                                                         "upstream_anthropic": teacher.url})
            config = CaptureConfig(retention_sweep_s=0, serve_url=serve_url, routing_refresh_s=0.2,
                                   student_timeout_s=30)
            with BackgroundServer(create_app(proxy_settings, store, config)) as proxy:
                client = openai.OpenAI(base_url=f"{proxy.url}/v1/capture/openai", api_key=key, max_retries=0,
                                       default_headers={"x-upstream-api-key": UPSTREAM_KEY,
                                                        "x-kolm-namespace": DEMO_NAMESPACE})
                api = httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {key}"}, timeout=60)

                def switch(**changes) -> str | None:
                    """None, or why the change was refused."""
                    reply = api.post(f"/v1/namespaces/{DEMO_NAMESPACE}/switches", json=changes)
                    if reply.status_code != 200:
                        return reply.json()["error"]["message"]
                    time.sleep(0.5)  # the proxy reads the switch again within routing_refresh_s
                    return None

                def status() -> dict:
                    return api.get(f"/v1/namespaces/{DEMO_NAMESPACE}/status").json()["routing"]

                if refused := switch(routing="teacher"):  # a reused home may still route `student`
                    raise SystemExit(refused)
                ask(client, tickets[0])  # warm-up: connections, the serve's first pass
                latency: dict[str, list[float]] = {"teacher": [], "shadow": []}
                first = tickets[: 2 * args.requests]
                print(f"teacher and shadow rounds, {args.requests} requests each, interleaved…", flush=True)
                for block in range(0, len(first), 20):
                    for mode in (("teacher", "shadow") if block % 40 == 0 else ("shadow", "teacher")):
                        if refused := switch(routing=mode):
                            raise SystemExit(refused)
                        for ticket in first[block: block + 20][mode == "shadow"::2]:
                            answer, who, seconds = ask(client, ticket)
                            assert who == "teacher" and answer == ticket.queue, (who, answer, ticket.queue)
                            latency[mode].append(seconds)
                            time.sleep(args.pace)
                time.sleep(2)
                shadow = status()
                figures["shadow"] = {"compared": shadow["compared"], "agreement": shadow["agreement"],
                                     "threshold_at_target": shadow["threshold"], "kept_share": shadow["kept_share"],
                                     "kept_agreement": shadow["kept_agreement"],
                                     "kept_agreement_lower": shadow["kept_agreement_lower"],
                                     "student_p50_ms": shadow["student_p50_ms"]}
                for mode in ("teacher", "shadow"):
                    figures[f"{mode}_p50_ms"] = round(1000 * statistics.median(latency[mode]), 3)
                figures["shadow_added_p50_ms"] = round(figures["shadow_p50_ms"] - figures["teacher_p50_ms"], 3)
                print(json.dumps(figures, indent=2), flush=True)

                refused = switch(routing="student", routing_target=args.target, canary_share=args.canary,
                                 shadow_min=min(200, shadow["compared"]))
                if refused:
                    figures["student"] = {"target": args.target, "refused": refused}
                    raise _Done
                student_latency, served, agreed = [], 0, 0
                print(f"student round, {args.requests} requests…", flush=True)
                for ticket in tickets[2 * args.requests:]:
                    answer, who, seconds = ask(client, ticket)
                    student_latency.append(seconds)
                    if who != "teacher":
                        served += 1
                        agreed += answer.strip() == ticket.queue
                    time.sleep(args.pace)
                time.sleep(2)
                routed = status()
                figures["student"] = {
                    "target": args.target, "canary_share": args.canary, "answered_by_student": served,
                    "student_share": served / args.requests,
                    "student_answers_agreeing": agreed / served if served else None,
                    "escalation_rate": routed["escalation_rate"], "p50_ms": round(1000 * statistics.median(
                        student_latency), 3),
                    "dollars_avoided": routed["dollars_avoided"],
                    "dollars_avoided_per_1000_requests": routed["dollars_avoided"] * 1000 / args.requests,
                }
    except _Done:
        pass
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    print(json.dumps(figures, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
