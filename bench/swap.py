"""Hot swap under steady load: 20 pointer swaps while concurrent clients keep calling `kolm serve`.

    .venv/bin/python bench/swap.py                       # embedded SmolLM2-135M, 20 swaps, 4 clients
    .venv/bin/python bench/swap.py --base /path/to/model --swaps 20 --clients 4 --task-kind free-text

What it does: builds 21 distinct LoRA adapters (rank 16 on every linear layer; by default variants of one
adapter really distilled from demo tickets, see `build_adapters`) for the base model and packs each into a
signed `.kolm`, starts `kolm serve` (transformers backend) as its own process on a fresh KOLM_HOME, puts the
clients in a closed loop of chat completions, then swaps the task's pointer 20 times, each time to an adapter
the runtime has never seen (so every swap verifies, extracts, loads and warms a cold adapter). Measured per
swap: the time from the pointer change (`os.replace` returned) to the end of the first response served by the
new adapter (its `x-kolm-adapter-cid` header). Over the run: failed requests (anything but HTTP 200 with a
non-empty answer) and request latency during swaps (requests in flight between a pointer change and one second
after its first new response) against steady state.

The default task is closed-vocabulary (the demo's ticket queues, decoded constrained to the label set);
`--task-kind free-text` generates `--max-tokens` tokens instead. Requests, swaps and the server share the
machine's cores: on a 2-core machine that is the whole budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_pipeline.demo.tickets import QUEUES, generate_tickets  # noqa: E402
from kolm_pipeline.provenance.receipts import make_receipt, receipt_cid  # noqa: E402
from kolm_pipeline.registry import build_kolm, cid_for_bytes, ensure_tenant_keys, load_private_key  # noqa: E402
from kolm_pipeline.registry.artifact import adapter_file_cids  # noqa: E402
from kolm_pipeline.registry.swap import publish_artifact, swap_pointer  # noqa: E402
from kolm_pipeline.settings import EMBEDDED_BASE_MODEL, load_settings  # noqa: E402
from kolm_pipeline.store import CaptureStore  # noqa: E402

TASK = "bench.swap"


@dataclass
class Request:
    began: float
    ended: float
    ok: bool
    cid: str | None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.began


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def build_adapters(base_path: Path, out: Path, count: int, rank: int, kind: str) -> list[Path]:
    """``count`` distinct LoRA adapters (rank ``rank`` on every linear layer), saved as PEFT saves one.

    ``trained``: one adapter distilled from 160 demo tickets (1 epoch, kolm's trainer), then each copy's
    matrices nudged by seeded noise (std 1e-3): distinct weights and CIDs, a trained adapter's confident
    label choices, like a nightly retrain replacing yesterday's. ``random``: LoRA matrices drawn at random
    (std 0.02): an untrained adapter whose label scores are flat, the worst case for constrained decoding.
    """
    import torch
    from safetensors.torch import load_file, save_file

    template = out / "template"
    if kind == "trained":
        from kolm_pipeline.train.base_model import BaseModel
        from kolm_pipeline.train.distill import TrainConfig, train_adapter

        train = out / "train.jsonl"
        train.parent.mkdir(parents=True, exist_ok=True)
        train.write_text("".join(json.dumps({"messages": [*t.messages(), {"role": "assistant", "content": t.queue}]})
                                 + "\n" for t in generate_tickets(160, seed=11)))
        train_adapter(train, BaseModel(model_id=str(base_path), path=base_path, digest="bench"), template,
                      TrainConfig(rank=rank, alpha=2 * rank, epochs=1), show_progress=False)
        noise = 1e-3
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_path)),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
        model.save_pretrained(str(template))
        noise = None
    weights = load_file(str(template / "adapter_model.safetensors"))
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(1000 + index)
        varied = {key: (tensor + noise * torch.randn(tensor.shape, generator=generator) if noise
                        else 0.02 * torch.randn(tensor.shape, generator=generator)) for key, tensor in weights.items()}
        path = out / f"adapter-{index:02d}"
        path.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
        save_file(varied, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def sign_artifact(output: Path, adapter_dir: Path, keys_dir: Path, base_id: str, base_digest: str,
                  labels: list[str] | None, index: int) -> Path:
    """A `.kolm` with a receipt chain signed by the bench tenant, as the deployment stage writes one."""
    keyid = ensure_tenant_keys(keys_dir, "bench")
    key = load_private_key(keys_dir, "bench")
    receipts: list[bytes] = []
    for stage in ("corpus", "recipe", "adapter", "evaluation"):
        files = {"files": adapter_file_cids(adapter_dir)} if stage == "adapter" else {}
        receipts.append(make_receipt(stage=stage, subject_name=stage,
                                     subject_cid=cid_for_bytes(f"bench {stage} {index}".encode()),
                                     predicate={"task": TASK, "note": "bench/swap.py synthetic adapter", **files},
                                     previous_cid=receipt_cid(receipts[-1]) if receipts else None,
                                     private_key=key, keyid=keyid))
    evals = {"candidate": {"k": 0.9}, "current": {"k": 0.5}, "decision": {"swap": True, "k_floor": 0.0}}
    manifest = {"task": TASK, "tenant": "bench", "namespace": "swap",
                "base_model": {"id": base_id, "digest": base_digest},
                "output_kind": "categorical" if labels else "free_text",
                "verifier": "closed_vocab" if labels else "text_match", "labels": labels, "evals": evals,
                "trainer_version": "bench", "parent_cid": None}
    build_kolm(output, manifest=manifest, adapter_dir=adapter_dir, evals=evals, receipts=receipts,
               signer=(key, keyid))
    return output


class Load:
    """Closed-loop clients calling the server until stopped; every request is recorded."""

    def __init__(self, url: str, clients: int, max_tokens: int, key: str) -> None:
        self.url, self.clients, self.max_tokens, self.key = url, clients, max_tokens, key
        self.records: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tickets = generate_tickets(200, seed=3)

    def start(self) -> None:
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers={"authorization": f"Bearer {self.key}"}) as client:
            turn = index
            while not self._stop.is_set():
                ticket = self._tickets[turn % len(self._tickets)]
                turn += self.clients
                began = time.monotonic()
                try:
                    response = client.post("/v1/chat/completions", json={
                        "model": TASK, "messages": ticket.messages(), "max_tokens": self.max_tokens})
                    content = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 \
                        else None
                    ok = response.status_code == 200 and bool(content)
                    record = Request(began, time.monotonic(), ok, response.headers.get("x-kolm-adapter-cid"),
                                     None if ok else f"HTTP {response.status_code}: {response.text[:200]}")
                except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its kind
                    record = Request(began, time.monotonic(), False, None, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.records.append(record)

    def first_served_by(self, cid: str, after: float) -> Request | None:
        with self._lock:
            served = [r for r in self.records if r.ok and r.cid == cid and r.ended >= after]
        return min(served, key=lambda r: r.ended) if served else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=os.environ.get("KOLM_BASE_MODEL") or EMBEDDED_BASE_MODEL)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", choices=["trained", "random"], default="trained",
                        help="trained: variants of one really distilled adapter; random: untrained LoRA weights")
    parser.add_argument("--task-kind", choices=["closed-vocab", "free-text"], default="closed-vocab")
    parser.add_argument("--max-tokens", type=int, default=16, help="free-text answer length")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds of steady state after each swap")
    parser.add_argument("--baseline", type=float, default=15.0, help="seconds of load before the first swap")
    parser.add_argument("--grace-seconds", type=float, default=5.0)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--home", help="KOLM_HOME for the run (default: a fresh temp dir, removed afterwards)")
    parser.add_argument("--server-log-level", default="warning", help="info logs each swap's phases to serve.log")
    parser.add_argument("--threads", type=int, help="`kolm serve --threads` (torch inference threads)")
    parser.add_argument("--max-batch", type=int, help="`kolm serve --max-batch`")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from kolm_pipeline.train.base_model import resolve_base_model

    home = Path(args.home or tempfile.mkdtemp(prefix="kolm-bench-swap-")).resolve()
    os.environ["KOLM_HOME"] = str(home)
    # The dequantized embedded base is cached once per checkout (as `make demo` and the tests do).
    os.environ.setdefault("KOLM_MODEL_CACHE", str(ROOT / ".kolm" / "models"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings(home)
    base = resolve_base_model(args.base, settings.models_dir)
    labels = sorted(QUEUES) if args.task_kind == "closed-vocab" else None
    began = time.monotonic()
    adapters = build_adapters(base.path, home / "bench-adapters", args.swaps + 1, args.rank, args.adapters)
    artifacts = []
    for index, adapter in enumerate(adapters):
        built = sign_artifact(home / "bench-artifacts" / f"{index:02d}.kolm", adapter, settings.keys_dir,
                              base.model_id, base.digest, labels, index)
        artifacts.append(publish_artifact(settings.artifacts_dir, TASK, built))
    size_mb = artifacts[0].stat().st_size / 1e6
    print(f"built {len(artifacts)} {args.adapters} artifacts of {size_mb:.1f} MB (rank {args.rank}, all linear layers) "
          f"in {time.monotonic() - began:.0f} s")
    swap_pointer(settings.adapters_dir, TASK, artifacts[0])
    key = CaptureStore(settings.store_url).create_tenant("bench")  # `kolm serve` answers the tenant's kolm key

    port = _free_port()
    env = {**os.environ, "KOLM_HOME": str(home), "KOLM_BASE_MODEL": args.base,
           "KOLM_MODEL_CACHE": str(settings.models_dir)}
    log_path = home / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kolm_pipeline.cli", "serve", "--port", str(port),
             "--log-level", args.server_log_level,
             "--poll-interval", str(args.poll_interval), "--grace-seconds", str(args.grace_seconds),
             *(["--threads", str(args.threads)] if args.threads else []),
             *(["--max-batch", str(args.max_batch)] if args.max_batch else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"kolm serve exited ({server.returncode}); see {log_path}")
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2, headers={"authorization": f"Bearer {key}"}).json()
                if TASK in {model["id"] for model in models.get("data", [])}:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"kolm serve did not become ready; see {log_path}")
            time.sleep(0.2)

        load = Load(url, args.clients, args.max_tokens if labels is None else 1, key)
        load.start()
        time.sleep(args.baseline)  # steady state before the first swap: the latency baseline
        swaps: list[tuple[float, float]] = []  # (pointer change, first new response end)
        for index in range(1, args.swaps + 1):
            target = artifacts[index]
            swap_pointer(settings.adapters_dir, TASK, target)
            changed = time.monotonic()
            first = None
            while first is None:
                if time.monotonic() - changed > 60:
                    raise SystemExit(f"swap {index}: no response from {target.stem} within 60 s; see {log_path}")
                time.sleep(0.005)
                first = load.first_served_by(target.stem, changed)
            swaps.append((changed, first.ended))
            print(f"  swap {index:2d}: first response from the new adapter {first.ended - changed:6.3f} s "
                  f"after the pointer change")
            time.sleep(args.settle)
        load.stop()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    records = load.records
    windows = [(changed, first + 1.0) for changed, first in swaps]

    def in_swap(record: Request) -> bool:
        return any(record.began < end and record.ended > start for start, end in windows)

    steady = [r.seconds for r in records if r.ok and not in_swap(r)]
    during = [r.seconds for r in records if r.ok and in_swap(r)]
    failures = [r for r in records if not r.ok]
    to_new = [first - changed for changed, first in swaps]
    figures = {
        "base_model": base.model_id, "task_kind": args.task_kind, "adapters": args.adapters,
        "swaps": len(swaps), "clients": args.clients,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "artifact_mb": round(size_mb, 1),
        "swap_to_first_new_response_s": {"p50": _percentile(to_new, 50), "p99": _percentile(to_new, 99),
                                         "max": max(to_new), "mean": statistics.fmean(to_new)},
        "requests": len(records), "failed_requests": len(failures),
        "latency_steady_s": {"p50": _percentile(steady, 50), "p99": _percentile(steady, 99), "n": len(steady)},
        "latency_during_swaps_s": {"p50": _percentile(during, 50), "p99": _percentile(during, 99),
                                   "n": len(during)},
    }
    print()
    print(f"base {base.model_id}, {args.task_kind}, {args.clients} concurrent clients, {os.cpu_count()} CPU cores, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"pointer change → first response from the new adapter ({len(swaps)} swaps): "
          f"p50 {figures['swap_to_first_new_response_s']['p50']:.3f} s, "
          f"p99 {figures['swap_to_first_new_response_s']['p99']:.3f} s, max {max(to_new):.3f} s")
    print(f"requests: {len(records)}, failed: {len(failures)}")
    for label, key in (("steady state", "latency_steady_s"), ("during swaps", "latency_during_swaps_s")):
        block = figures[key]
        print(f"latency {label:<13} p50 {block['p50'] * 1000:7.1f} ms  p99 {block['p99'] * 1000:7.1f} ms  "
              f"({block['n']} requests)")
    ratio = figures["latency_during_swaps_s"]["p50"] / figures["latency_steady_s"]["p50"]
    print(f"latency change during swaps: p50 ×{ratio:.2f}, "
          f"p99 ×{figures['latency_during_swaps_s']['p99'] / figures['latency_steady_s']['p99']:.2f}")
    for failure in failures[:5]:
        print(f"  failed: {failure.error}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.home is None:
        shutil.rmtree(home, ignore_errors=True)  # ~1 GB of adapters; pass --home to keep them
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
