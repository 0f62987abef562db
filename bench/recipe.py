"""Recipe synthesis benchmarks.

    .venv/bin/python bench/recipe.py timing            # corpus + recipe synthesis time, 1,000 and 10,000 observations
    .venv/bin/python bench/recipe.py kfloor            # compile every fixture recipe, count first-try K-floor passes

`timing` prints wall and CPU seconds per stage and the load average (other processes on the machine slow
the wall clock; CPU seconds do not depend on them). The embedding model's one-time load is timed
separately from synthesis, which reuses it like a long-running Dagster code server does.

`kfloor` synthesizes one recipe per fixture in kolm_pipeline_tests/fixtures/observations.py and compiles
it with the configured base model (`kolm_pipeline.stages.compile.compile_recipe`; set KOLM_MODEL_CACHE to
reuse the dequantized embedded base), then reports whether the candidate's K reaches the recipe's own
K-floor. Results are appended to --out as they arrive, so an interrupted run still reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kolm_pipeline.corpus.build import build_corpus, corpus_cid, read_corpus  # noqa: E402
from kolm_pipeline.corpus.recipe import synthesize_recipe  # noqa: E402
from kolm_pipeline_tests.fixtures.observations import FIXTURES, unique_rows  # noqa: E402


@dataclass
class Pair:
    """A kept pair as the capture store returns it."""

    id: int
    messages: list[dict]
    output: str
    model: str
    latency_us: int
    prompt_tokens: int | None
    completion_tokens: int | None
    tags: list[str] = field(default_factory=list)


def _pairs(rows: list[dict]) -> list[Pair]:
    return [Pair(id=index + 1, messages=row["messages"][:-1], output=row["messages"][-1]["content"],
                 model=row["meta"]["model"], latency_us=row["meta"]["latency_us"],
                 prompt_tokens=row["meta"]["prompt_tokens"], completion_tokens=row["meta"]["completion_tokens"])
            for index, row in enumerate(rows)]


def _cid(rows: list[dict]) -> str:
    return corpus_cid("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def timing(args: argparse.Namespace) -> None:
    import torch

    from kolm_pipeline.corpus.embeddings import load_model

    print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    with Clock() as load:
        load_model()
    print(f"embedding model load (once per process): wall {load.wall:.2f} s, cpu {load.cpu:.2f} s")
    print(f"{'fixture':<16}{'obs':>7}{'corpus':>8}{'written':>9}{'synth wall':>12}{'synth cpu':>11}  kind")
    results = []
    for size in args.sizes:
        for name in args.fixtures:
            generate, _ = FIXTURES[name]
            rows = generate(size, 1)
            pairs = _pairs(rows)
            with Clock() as corpus_clock:
                data, stats = build_corpus(pairs)
            corpus_rows = read_corpus(data)
            with tempfile.TemporaryDirectory() as scratch, Clock() as synth:
                recipe = synthesize_recipe(corpus_rows, Path(scratch) / "recipe", task="bench.t", tenant="bench",
                                           namespace="t", corpus_cid=corpus_cid(data),
                                           frozen_holdout=Path(scratch) / "h.jsonl")
            print(f"{name:<16}{size:>7}{corpus_clock.wall:>7.2f}s{stats.written:>9}{synth.wall:>11.2f}s"
                  f"{synth.cpu:>10.2f}s  {recipe.spec['output_kind']}")
            results.append({"fixture": name, "observations": size, "written": stats.written,
                            "corpus_wall_s": round(corpus_clock.wall, 3), "synth_wall_s": round(synth.wall, 3),
                            "synth_cpu_s": round(synth.cpu, 3), "kind": recipe.spec["output_kind"]})
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model_load_wall_s": round(load.wall, 3), "runs": results}, indent=2))


def kfloor(args: argparse.Namespace) -> None:
    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.stages.compile import compile_recipe

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() and args.resume else []
    finished = {entry["fixture"] for entry in done}
    work = Path(tempfile.mkdtemp(prefix="kolm-kfloor-"))
    settings = load_settings(work / "home")
    print(f"base {settings.base_model}, model cache {settings.models_dir}, scratch {work}")
    for name in args.fixtures:
        if name in finished:
            continue
        generate, expected = FIXTURES[name]
        rows = unique_rows(generate(args.pairs, args.seed))
        recipe_dir = work / name
        began = time.perf_counter()
        recipe = synthesize_recipe(rows, recipe_dir, task=f"bench.{name}".replace("_", "-"), tenant="bench",
                                   namespace=name.replace("_", "-"), corpus_cid=_cid(rows),
                                   frozen_holdout=work / f"{name}.holdout.jsonl", seed=args.seed)
        floor = recipe.spec["k_floor"]
        try:
            result = compile_recipe(settings, recipe_dir, work / f"{name}.kolm", tenant="bench", epochs=args.epochs)
        except Exception as exc:  # a failed compile is a failed first try, recorded as such
            entry = {"fixture": name, "kind": recipe.spec["output_kind"], "k_floor": floor, "error": repr(exc),
                     "passes_floor": False}
        else:
            evaluation = result.evaluation.document()
            candidate, base = evaluation["candidate"], evaluation["current"]
            entry = {
                "fixture": name,
                "kind": recipe.spec["output_kind"],
                "expected_kind": expected,
                "pairs": len(rows),
                "counts": recipe.spec["counts"],
                "k_floor": floor,
                "purity": recipe.diagnostics["clusters"]["purity"],
                "candidate": {key: candidate[key] for key in ("k", "accuracy", "size", "latency", "cost", "coverage",
                                                             "holdout_accuracy")},
                "base": {key: base[key] for key in ("k", "accuracy", "coverage", "holdout_accuracy")},
                "passes_floor": candidate["k"] >= floor,
                "gate": result.evaluation.decision.reason,
            }
        entry["seconds"] = round(time.perf_counter() - began, 1)
        done.append(entry)
        out.write_text(json.dumps(done, indent=2))
        print(json.dumps(entry), flush=True)
    passed = sum(1 for entry in done if entry["passes_floor"])
    print(f"first-try K-floor passes: {passed}/{len(done)} = {passed / max(1, len(done)):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("timing", help="synthesis time for 1,000 and 10,000 observations")
    t.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    t.add_argument("--fixtures", nargs="+", default=["tickets", "order_intake", "email_address", "refund_reply"],
                   choices=sorted(FIXTURES))
    t.add_argument("--out", help="write the figures as JSON here too")
    k = sub.add_parser("kfloor", help="compile every fixture recipe and check its K-floor")
    k.add_argument("--pairs", type=int, default=150)
    k.add_argument("--epochs", type=float, default=2.0)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--fixtures", nargs="+", default=list(FIXTURES), choices=sorted(FIXTURES))
    k.add_argument("--out", default="kfloor-results.json")
    k.add_argument("--resume", action="store_true", help="skip fixtures already in --out")
    args = parser.parse_args()
    timing(args) if args.command == "timing" else kfloor(args)


if __name__ == "__main__":
    main()
