"""Why `kolm serve` runs every torch computation on one thread: a decoding pass's worth of small matmuls, timed on
a serving thread in a process where no other thread ran torch, and in one where the main thread ran torch first (as
`kolm serve` did before session 22: it loaded the model on its main thread and decoded on its model thread).

    .venv/bin/python bench/omp_teams.py                # the embedded base's layer shapes, bfloat16, 30 layers
    .venv/bin/python bench/omp_teams.py --dtype float32 --rounds 5

torch's CPU kernels run on an OpenMP team belonging to the thread that calls them. With a second thread's team in
the process, OpenMP's idle workers stop spinning between parallel regions (more OpenMP threads than cores): each of
a pass's ~200 small parallel regions waits for its worker to wake. The script prints the median pass of each side
(fresh processes, alternating rounds, so background load hits both) and their ratio. Run nothing else beside it.
docs/benchmarks.md, session 22, has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# (out, in) features of one decoder layer of SmolLM2-135M: q, k, v, o, gate, up, down.
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def passes(dtype: str, rows: int, layers: int, count: int = 30) -> float:
    """Median milliseconds of a pass: every layer's matmuls on ``rows`` tokens, plus an elementwise op each."""
    import torch
    import torch.nn.functional as F

    kind = getattr(torch, dtype)
    weights = [torch.randn(out, inp, dtype=kind) for out, inp in LAYER * layers]
    x = torch.randn(rows, 1536, dtype=kind)
    times = []
    with torch.inference_mode():
        for _ in range(count):
            began = time.perf_counter()
            for weight in weights:
                y = F.linear(x[:, : weight.shape[1]], weight)
                y = y * 1.01 + 0.5
            times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times[3:])


def child(side: str, dtype: str, rows: int, layers: int) -> None:
    """One side in this (fresh) process: ``alone`` (only the serving thread runs torch) or ``main-first``."""
    if side == "main-first":
        passes(dtype, rows, layers, 4)  # the main thread runs torch, as loading a model on it does
    print(f"{ThreadPoolExecutor(1).submit(passes, dtype, rows, layers).result():.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=16, help="tokens a pass reads (4 rows x 4 tokens: serving's)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes, each measuring both sides")
    parser.add_argument("--child", choices=["alone", "main-first"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype, args.rows, args.layers)
        return 0
    print(f"bench/omp_teams.py: {args.layers} layers of SmolLM2-135M's matmuls on {args.rows} tokens, {args.dtype}")
    print("| round | serving thread, no other thread ran torch (ms a pass) | the main thread ran torch first | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for number in range(1, args.rounds + 1):
        measured = {}
        for side in (["alone", "main-first"] if number % 2 else ["main-first", "alone"]):
            measured[side] = float(subprocess.run(
                [sys.executable, __file__, "--child", side, "--dtype", args.dtype, "--rows", str(args.rows),
                 "--layers", str(args.layers)], capture_output=True, text=True, check=True).stdout)
        ratios.append(measured["main-first"] / measured["alone"])
        print(f"| {number} | {measured['alone']:.1f} | {measured['main-first']:.1f} | {ratios[-1]:.2f}x |", flush=True)
    print(f"\nmedian: a pass takes {statistics.median(ratios):.2f}x as long once the main thread has run torch too")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
