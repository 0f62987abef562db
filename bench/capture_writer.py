"""CPU time the capture writer spends per proxied call: parse the reply, redact,
digest and insert into the embedded SQLite store — everything `kolm capture serve` hands to its writer
process. Every call carries a distinct prompt (as real traffic does), into a store that already holds
`--rows` captures, with time-ordered request ids as the proxy makes them.

    .venv/bin/python bench/capture_writer.py                  # 100,000 rows first, then 10,000 calls a mode
    .venv/bin/python bench/capture_writer.py --rows 0 --calls 2000
    .venv/bin/python bench/capture_writer.py --instructions   # instructions per call, under valgrind

Prints µs of CPU per call (process time, so other load on the machine inflates it less than wall time) for
plain and streamed replies, and how the cost splits into building the record, redacting it and writing it.

On a shared machine CPU time still swings by a quarter from minute to minute. `--instructions` counts
instead the instructions the writer executes per call (valgrind's callgrind, installed with
`apt-get install valgrind`): the same code gives the same count to within a fraction of a percent, so two
versions compare exactly, whatever else the machine does. It runs the setup twice under callgrind, once
writing 1,000 calls and once not, and divides the difference (about two minutes a mode).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_pipeline.capture.batch import BatchWriter, Pending, build  # noqa: E402
from kolm_pipeline.capture.forward import new_request_id  # noqa: E402
from kolm_pipeline.capture.redact import Redactor  # noqa: E402
from kolm_pipeline.settings import load_settings  # noqa: E402
from kolm_pipeline.store import CaptureStore  # noqa: E402

BATCH = 200
PLAIN = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fin-ops"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
    }
).encode()


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "fin-"}),
        _chunk({"content": "ops"}),
        _chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]
)
ORDERS = itertools.count(10_000)


def calls_of(count: int, stream: bool) -> list[Pending]:
    """Finished calls as the proxy hands them over, each with its own prompt."""
    batch = []
    for _ in range(count):
        prompt = f"I was charged twice for order {next(ORDERS)}"
        request = json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "stream": stream}
        ).encode()
        batch.append(
            Pending(
                new_request_id(), "bench", "bench", "openai", "gpt-4o", request, (), stream,
                "stream" if stream else "reply", 200, STREAM if stream else PLAIN, 1234, time.time(),
            )
        )  # fmt: skip
    return batch


def per_call_us(seconds: float, count: int) -> float:
    return seconds / count * 1e6


def callgrind_part(write: bool, stream: bool, calls: int) -> None:
    """What one callgrind run executes: a store with 2,000 captures, then `calls` calls built (and written
    only when `write`), so that the difference of two runs is the writing alone."""
    store = CaptureStore(load_settings(Path(tempfile.mkdtemp(prefix="kolm-bench-writer-"))).store_url)
    store.create_tenant("bench")
    writer = BatchWriter(store, None)
    for _ in range(10):
        writer.write(calls_of(200, stream))
    batches = [calls_of(BATCH, stream) for _ in range(calls // BATCH)]
    if write:
        for batch in batches:
            writer.write(batch)
    store.close()


def instructions_per_call(stream: bool, calls: int) -> int:
    """Instructions the writer executes per call, counted by callgrind (deterministic, unlike CPU time)."""
    counts = []
    for part in ("skip", "write"):
        command = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
            "--callgrind-part", part, "--calls", str(calls), *(["--stream"] if stream else []),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) // (calls // BATCH * BATCH)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="captures stored before measuring")
    parser.add_argument("--calls", type=int, default=10_000, help="calls measured per mode")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per call under valgrind (1,000 calls a mode)"
    )
    parser.add_argument("--callgrind-part", choices=("skip", "write"), help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_part:
        callgrind_part(args.callgrind_part == "write", args.stream, args.calls)
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            parser.error("--instructions needs valgrind (apt-get install valgrind)")
        calls = 1000 if args.calls == parser.get_default("calls") else args.calls
        for stream in (False, True):
            count = instructions_per_call(stream, calls)
            print(f"{'stream' if stream else 'plain':<6}: {count:,} instructions per call ({calls} calls, callgrind)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="kolm-bench-writer-"))
    store = CaptureStore(load_settings(home).store_url)
    store.create_tenant("bench")
    writer = BatchWriter(store, None)
    for start in range(0, args.rows, 2000):
        writer.write(calls_of(min(2000, args.rows - start), stream=False))
    print(f"store: {store.counters('bench', 'bench')['captured']} captures before measuring; batches of {BATCH}")
    redactor = Redactor()
    for stream in (False, True):  # warm every code path before timing any
        for call in calls_of(1000, stream):
            redactor.capture(build(call))
    for stream in (False, True):
        batches = [calls_of(BATCH, stream) for _ in range(max(1, args.calls // BATCH))]
        count = BATCH * len(batches)
        sample = batches[: max(1, len(batches) // 5)]
        started = time.process_time()
        records = [[build(call) for call in batch] for batch in sample]
        build_s = time.process_time() - started
        started = time.process_time()
        for batch in records:
            for record in batch:
                redactor.capture(record)
        redact_s = time.process_time() - started
        sampled = BATCH * len(sample)
        rounds = []
        for batch in batches:
            started = time.process_time()
            writer.write(batch)
            rounds.append(per_call_us(time.process_time() - started, len(batch)))
        total = statistics.median(rounds)
        build_us, redact_us = per_call_us(build_s, sampled), per_call_us(redact_s, sampled)
        print(
            f"{'stream' if stream else 'plain':<6}: {total:5.1f} µs CPU per call (median of {len(rounds)} batches, "
            f"{count} calls) — build {build_us:.1f}, redact {redact_us:.1f}, "
            f"write (digests, insert, commit) ≈ {max(0.0, total - build_us - redact_us):.1f}"
        )
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
