"""CPU time the capture writer spends per proxied call: parse the reply, scrub the provider key, redact,
digest and insert into the embedded SQLite store — everything `kolm capture serve` hands to its writer
process. Every call carries a distinct prompt (as real traffic does), into a store that already holds
`--rows` captures, with time-ordered request ids as the proxy makes them.

    .venv/bin/python bench/capture_writer.py                  # 100,000 rows first, then 10,000 calls a mode
    .venv/bin/python bench/capture_writer.py --rows 0 --calls 2000

Prints µs of CPU per call (process time, so other load on the machine inflates it less than wall time) for
plain and streamed replies, and how the cost splits into building the record, redacting it and writing it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_pipeline.capture.forward import new_request_id  # noqa: E402
from kolm_pipeline.capture.recorder import BatchWriter, Pending, build  # noqa: E402
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


def calls(count: int, stream: bool) -> list[Pending]:
    """Finished calls as the proxy hands them over, each with its own prompt."""
    batch = []
    for _ in range(count):
        prompt = f"I was charged twice for order {next(ORDERS)}"
        request = json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "stream": stream}
        ).encode()
        batch.append(
            Pending(
                new_request_id(), "bench", "bench", "openai", "gpt-4o", request, [], stream, "sk-upstream",
                "stream" if stream else "reply", 200, STREAM if stream else PLAIN, 1234, time.time(),
            )
        )  # fmt: skip
    return batch


def per_call_us(seconds: float, count: int) -> float:
    return seconds / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="captures stored before measuring")
    parser.add_argument("--calls", type=int, default=10_000, help="calls measured per mode")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kolm-bench-writer-"))
    store = CaptureStore(load_settings(home).store_url)
    store.create_tenant("bench")
    writer = BatchWriter(store, None)
    for start in range(0, args.rows, 2000):
        writer.write(calls(min(2000, args.rows - start), stream=False))
    print(f"store: {store.counters('bench', 'bench')['captured']} captures before measuring; batches of {BATCH}")
    redactor = Redactor()
    for stream in (False, True):  # warm every code path before timing any
        for call in calls(1000, stream):
            redactor.capture(build(call))
    for stream in (False, True):
        batches = [calls(BATCH, stream) for _ in range(max(1, args.calls // BATCH))]
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
