"""Reaching the captured data from the command line: `kolm capture status|list|export` and
`kolm triage correct`. Listing and export run the store's one capture query (`store/capture_search.py`),
the same the inbox's dataset view runs."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kolm_pipeline.cli_verbs.common import (
    CliError,
    clip,
    namespace_of,
    open_store,
    open_store_for_reading,
    print_json,
    settings_for_reading,
    settings_for_writing,
    table,
)
from kolm_pipeline.store.tables import ROUTING_MODES

# `pending` is what a newcomer calls a capture nobody triaged yet; the store calls it `untriaged`.
STATE_CHOICES = ("kept", "discarded", "pending", "untriaged")
EXPORT_FORMATS = ("jsonl", "csv")


def cmd_capture_status(args: argparse.Namespace) -> int:
    """Print the counters and switches of a namespace; `--retention-days`, `--implicit-signals` and
    `--distill-ready` change a switch first, `--recount` counts the captures again (each change is written to
    the audit log). Without those it only reads, and creates nothing."""
    tenant, namespace = namespace_of(args)
    changes = {"retention_days": args.retention_days,
               "implicit_signals": None if args.implicit_signals is None else args.implicit_signals == "on",
               "distill_ready": None if args.distill_ready is None else args.distill_ready == "on",
               "routing": args.routing, "routing_target": args.routing_target, "canary_share": args.canary_share,
               "shadow_min": args.shadow_min, "image_bytes_limit": args.image_bytes_limit}
    changes = {name: value for name, value in changes.items() if value is not None}
    if changes or args.recount:
        settings = settings_for_writing(args)
        store = open_store(settings)
    else:
        settings = settings_for_reading(args)
        store = open_store_for_reading(settings)
    if changes:
        store.set_switches(tenant, namespace, f"cli:{args.actor}", **changes)
    if args.recount:
        before = store.recount(tenant, namespace, f"cli:{args.actor}")
        after = store.counters(tenant, namespace)
        print(f"recounted {tenant}.{namespace}: " + (", ".join(
            f"{name} {before[name]} → {after[name]}" for name in after if before[name] != after[name]) or "no change"),
            file=sys.stderr if args.json else sys.stdout)
    status = {**store.status(tenant, namespace, settings.price_table), "namespace": f"{tenant}.{namespace}",
              "distill_threshold": settings.distill_threshold}
    if args.json:
        print_json(status)
        return 0
    counters = status["counters"]
    print(f"namespace {status['namespace']}")
    print(table(list(counters), [list(counters.values())], right=list(counters)))
    switches = {**{name: _on_off(value) for name, value in status["switches"].items()},
                "redaction": status["redaction"] if isinstance(status["redaction"], str)
                else ",".join(status["redaction"]) or "none",
                "distill_threshold": status["distill_threshold"]}
    print()
    print(table(["switch", "value"], list(switches.items())))
    routing = status["routing"]
    if routing["mode"] != "teacher" or routing["compared"]:
        print()
        print(table(["routing", "value"], list(_routing_rows(routing))))
        if routing["missing"] and routing["mode"] == "shadow":
            print(f"\nstudent routing not ready: {routing['missing']}")
    return 0


def _routing_rows(routing: dict[str, Any]):
    """The routing figures that mean something now, formatted for the table."""
    for name in ("adapter_cid", "compared", "agreement", "threshold", "kept_share", "kept_agreement",
                 "kept_agreement_lower", "disagreements", "student_answered", "escalated", "canaries",
                 "student_share", "escalation_rate", "student_p50_ms", "teacher_p50_ms", "dollars_avoided"):
        value = routing[name]
        if value is None:
            value = "-"
        elif isinstance(value, float):
            value = f"{value:.4f}" if name != "dollars_avoided" else f"${value:.4f}"
        yield name, value


def _on_off(value: Any) -> Any:
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _filter(args: argparse.Namespace, tenant: str, namespace: str):
    from kolm_pipeline.store import CaptureFilter, parse_time

    state = "untriaged" if args.state == "pending" else args.state
    return CaptureFilter(
        namespace=namespace, state=state, tag=args.tag,
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        search=args.search,
    )


def _last_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content", "")
            return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return ""


def cmd_capture_list(args: argparse.Namespace) -> int:
    """A page of a namespace's captures, newest first, as a table (or `--json`)."""
    from kolm_pipeline.store import capture_dict

    tenant, namespace = namespace_of(args)
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    if args.offset < 0:
        raise CliError("--offset must not be negative")
    store = open_store_for_reading(settings_for_reading(args))
    page = store.find_captures(tenant, _filter(args, tenant, namespace), args.limit, args.offset)
    if args.json:
        print_json({"captures": [capture_dict(c) for c in page.captures], "total": page.total,
                    "limit": page.limit, "offset": page.offset})
        return 0
    if not page.captures:
        known = [name for _, name in store.namespaces(tenant)]
        if page.total == 0 and namespace not in known:
            raise CliError(f"no captures in {tenant}.{namespace}; {tenant}'s namespaces: "
                           f"{', '.join(known) or '(none yet)'}")
        print(f"no captures of {tenant}.{namespace} match" if page.offset == 0 or page.total == 0
              else f"{page.total} match; --offset {page.offset} is past the last")
        return 0
    rows = []
    for capture in page.captures:
        expired = capture.expired_at is not None
        output = capture.feedback_output if capture.feedback_output is not None else capture.output_text
        marker = "*" if capture.feedback_output is not None else ""
        rows.append((capture.id, f"{capture.created_at:%Y-%m-%d %H:%M}", capture.triage_state, capture.status,
                     clip(",".join(capture.tags), 18), clip(capture.model, 20),
                     "(expired)" if expired else clip(_last_user(capture.messages), 44),
                     "(expired)" if expired else marker + clip(output, 36)))
    print(table(["id", "created (UTC)", "state", "status", "tags", "model", "input", "output"], rows, right=["id"]))
    first = page.offset + 1
    note = "; * = corrected by a person (the correction is what trains)" if any(r[-1].startswith("*") for r in rows) \
        else ""
    more = f"; --offset {page.offset + len(rows)} for more" if page.offset + len(rows) < page.total else ""
    print(f"{first}-{page.offset + len(rows)} of {page.total}, newest first{more}{note}")
    return 0


# A spreadsheet runs a cell starting with one of these as a formula (OWASP: CSV injection); captured texts are
# whatever a client sent, so such a cell gets a leading "'", which spreadsheets show as text. JSONL stays exact.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    return {name: _csv_cell(",".join(value) if name == "tags" else
                            json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value)
            for name, value in record.items()}


def _export_lines(records: Iterable[dict[str, Any]], fmt: str) -> Iterable[str]:
    """The export, a line (or CSV record) at a time."""
    if fmt == "jsonl":
        for record in records:
            yield json.dumps(record, ensure_ascii=False) + "\n"
        return
    from kolm_pipeline.store import Capture

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(Capture.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(_csv_row(record))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def cmd_capture_export(args: argparse.Namespace) -> int:
    """Every capture of a namespace that matches, as JSONL or CSV, to a file (written atomically: it appears
    whole or not at all) or to stdout."""
    from kolm_pipeline.provenance.atomic import atomic_output
    from kolm_pipeline.store import capture_dict

    tenant, namespace = namespace_of(args)
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise CliError(f"--output {output} is a directory; name a file")
    if output is not None and not output.parent.is_dir():
        raise CliError(f"--output {output}: no directory {output.parent}")
    store = open_store_for_reading(settings_for_reading(args))
    where = _filter(args, tenant, namespace)
    count = 0

    def records() -> Iterable[dict[str, Any]]:
        nonlocal count
        for capture in store.iter_captures(tenant, where, args.limit):
            count += 1
            yield capture_dict(capture)

    if output is None:
        for chunk in _export_lines(records(), args.format):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        print(f"exported {count} captures of {tenant}.{namespace} ({args.format})", file=sys.stderr)
        return 0
    with atomic_output(output, 0o600) as handle:
        for chunk in _export_lines(records(), args.format):
            handle.write(chunk.encode("utf-8"))
    print(f"exported {count} captures of {tenant}.{namespace} to {output} ({args.format})")
    return 0


def cmd_capture_import_image(args: argparse.Namespace) -> int:
    """Store an image the namespace's captures gave only by URL (the proxy never fetches one)."""
    from kolm_pipeline.capture.images import ImageError, image_store, import_image_by_url

    tenant, namespace = namespace_of(args)
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    settings = settings_for_writing(args)
    try:
        count = import_image_by_url(open_store(settings), image_store(settings), tenant, namespace, args.url, data)
    except ImageError as exc:
        raise CliError(f"{path}: {exc}") from None
    print(f"{tenant}.{namespace}: {count} capture(s) now refer to the image of {args.url} ({len(data)} bytes)")
    return 0


def cmd_triage_correct(args: argparse.Namespace) -> int:
    """Record a person's correction of one capture's answer (it replaces the teacher's output when trained)."""
    from kolm_pipeline.capture.corrections import record_correction

    tenant, namespace = namespace_of(args)
    if len(args.ids) != 1:
        raise CliError(f"triage correct takes one capture id, not {len(args.ids)}")
    if args.output is None:
        raise CliError("triage correct needs --output TEXT (the corrected answer; - reads it from stdin)")
    text = sys.stdin.read() if args.output == "-" else args.output
    [capture_id] = args.ids
    store = open_store(settings_for_writing(args))
    try:
        correction = record_correction(store, tenant, capture_id, text, args.actor, namespace=namespace)
    except LookupError as exc:
        raise CliError(str(exc).strip("'\"")) from None
    redacted = " (redacted before it was stored)" if correction.redacted else ""
    print(f"capture {capture_id} of {tenant}.{namespace}: correction recorded by {args.actor}{redacted}")
    if correction.capture.triage_state != "kept":
        print(f"it trains once the capture is kept: kolm triage keep --namespace {tenant}.{namespace} {capture_id}")
    return 0


def _add_filters(command: argparse.ArgumentParser) -> None:
    command.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    command.add_argument("--tenant")
    command.add_argument("--state", choices=STATE_CHOICES, help="triage state (pending = untriaged)")
    command.add_argument("--tag", help="captures carrying this tag")
    command.add_argument("--since", metavar="ISO", help="captured at or after this UTC time, e.g. 2025-06-01T09:00")
    command.add_argument("--until", metavar="ISO", help="captured before this UTC time")
    command.add_argument("--search", metavar="TEXT",
                         help="text in the input, output or correction (case-insensitive substring)")


def add_capture_parsers(capture_verbs: argparse._SubParsersAction, actor: str) -> None:
    status = capture_verbs.add_parser(
        "status", help="the counters and switches of a namespace",
        description="The counters and switches of a namespace (a table, or --json). The setters below change a "
        "switch first (each change is audited); without them it only reads.")
    status.set_defaults(handler=cmd_capture_status)
    status.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    status.add_argument("--tenant")
    status.add_argument("--retention-days", type=int, help="set the retention window (days) first")
    status.add_argument("--implicit-signals", choices=["on", "off"], help="set the implicit-signals switch first")
    status.add_argument("--distill-ready", choices=["on", "off"], help="set the distill-ready switch first")
    status.add_argument("--routing", choices=ROUTING_MODES,
                        help="who answers the namespace's traffic at the capture endpoint: teacher (the frontier "
                        "API), shadow (the teacher; the deployed adapter answers too, off the response path, and "
                        "is compared), student (the adapter when confident, else the teacher). student is "
                        "refused until enough shadow traffic agrees (see the routing table)")
    status.add_argument("--routing-target", type=float, metavar="AGREEMENT",
                        help="agreement with the teacher the student's kept answers must reach, with 95 %% "
                        "confidence (default 0.98; above 0, below 1)")
    status.add_argument("--canary-share", type=float, metavar="SHARE",
                        help="share of confident requests still sent to the teacher and compared (default 0.05)")
    status.add_argument("--shadow-min", type=int, metavar="N",
                        help="compared requests needed before routing student (default 200, at most 5000)")
    status.add_argument("--image-bytes-limit", type=int, metavar="BYTES",
                        help="most bytes of images the namespace's live captures keep (default 1 GiB; an image "
                        "beyond it is recorded as dropped; 0: keep none)")
    status.add_argument("--recount", action="store_true",
                        help="count the captures row by row first and store that as the counters (a repair)")
    status.add_argument("--actor", default=actor, help="who, for the audit log")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    listing = capture_verbs.add_parser(
        "list", help="list a namespace's captures, newest first, with filters",
        description="List a namespace's captures, newest first: id, time, triage state, tags, model, the last "
        "user message and the answer (a person's correction where there is one). Filters combine.")
    listing.set_defaults(handler=cmd_capture_list)
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=50, help="captures per page")
    listing.add_argument("--offset", type=int, default=0, help="skip this many (the next page)")
    listing.add_argument("--json", action="store_true", help="print the page as JSON (as GET /v1/captures does)")

    image = capture_verbs.add_parser(
        "import-image", help="give captures that sent an image by URL its bytes, so they can be trained on",
        description="The proxy records an image given as an http(s) URL and never fetches it, so those captures "
        "are left out of training. Import the image's bytes from a file you fetched yourself: it is checked to be a "
        "PNG, JPEG, GIF or WEBP, held to the namespace's image_bytes_limit, stored once by digest, and every live "
        "capture of the namespace that gave that URL refers to it from then on.")
    image.set_defaults(handler=cmd_capture_import_image)
    image.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    image.add_argument("--tenant", help="the tenant, when --namespace has none")
    image.add_argument("--url", required=True, help="the image URL exactly as the captures give it")
    image.add_argument("--file", required=True, help="the image's bytes")

    export = capture_verbs.add_parser(
        "export", help="export a namespace's captures as JSONL or CSV, with the same filters",
        description="Export every matching capture of a namespace, newest first: JSONL (one capture per line, as "
        "GET /v1/captures shows it) or CSV (the same fields; messages as JSON). To stdout, or to --output FILE "
        "written atomically (0600: it holds captured text).")
    export.set_defaults(handler=cmd_capture_export)
    _add_filters(export)
    export.add_argument("--format", choices=EXPORT_FORMATS, default="jsonl",
                        help="jsonl: every text exactly; csv: for spreadsheets (a text starting with = + - @ "
                        "or a tab gets a leading ' so it is not run as a formula)")
    export.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    export.add_argument("--limit", type=int, help="at most this many captures (default: all)")
