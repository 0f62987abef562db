"""Recipes: what to train, how to check it, and on which splits.

A recipe directory holds `spec.json` (validated against the schema shipped next to this module),
`train.jsonl`, `eval.jsonl`, `holdout.jsonl` and `diagnostics.json`. The pipeline synthesises one from
observations; people can write one by hand in the same format and `kolm compile` accepts it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from kolm_pipeline.corpus.build import input_key

SPEC_SCHEMA = json.loads((Path(__file__).with_name("recipe_spec.schema.json")).read_text())
RECIPE_FORMAT = "kolm-recipe/1"
DEFAULT_K_FLOOR = 0.50
HOLDOUT_SHARE = 0.15
EVAL_SHARE = 0.20
MAX_LABELS = 50


class RecipeError(Exception):
    """A recipe is invalid; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe directory."""

    path: Path
    spec: dict
    train: list[dict]
    eval: list[dict]
    holdout: list[dict]

    @property
    def labels(self) -> list[str] | None:
        return self.spec.get("labels")


VERIFIER_FOR_KIND = {
    "categorical": "closed_vocab",
    "json": "json_schema",
    "extractive": "byte_grounded",
    "free_text": "text_match",
}


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def prompt_text(row: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in row["messages"][:-1])


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def infer_json_schema(values: list[dict]) -> dict:
    """Object schema: property types seen, keys present in every value required, enums for short
    low-cardinality strings."""
    properties: dict[str, dict] = {}
    seen: dict[str, list] = defaultdict(list)
    for value in values:
        for key, item in value.items():
            seen[key].append(item)
    for key, items in seen.items():
        types = sorted({_json_type(item) for item in items})
        prop: dict = {"type": types[0] if len(types) == 1 else types}
        distinct = {item for item in items if isinstance(item, str)}
        if types == ["string"] and len(distinct) <= 10 and len(items) >= 3 * len(distinct):
            prop["enum"] = sorted(distinct)
        properties[key] = prop
    required = sorted(key for key, items in seen.items() if len(items) == len(values))
    return {"type": "object", "properties": properties, "required": required}


def detect_output_kind(rows: list[dict]) -> tuple[str, dict]:
    """Classify the outputs and return the kind plus what its verifier needs (labels or schema)."""
    outputs = [answer(row) for row in rows]
    parsed = []
    for output in outputs:
        try:
            value = json.loads(output)
        except json.JSONDecodeError:
            break
        if not isinstance(value, dict):
            break
        parsed.append(value)
    if outputs and len(parsed) == len(outputs):
        return "json", {"json_schema": infer_json_schema(parsed)}
    distinct = sorted(set(outputs))
    short = all(len(output.split()) <= 5 for output in outputs)
    if short and 2 <= len(distinct) <= min(MAX_LABELS, max(2, len(outputs) // 3)):
        return "categorical", {"labels": distinct}
    if outputs and all(output.strip() and output.strip() in prompt_text(row) for row, output in
                       zip(rows, outputs, strict=True)):
        return "extractive", {}
    return "free_text", {}


def _stratified_split(rows: list[dict], share: float, key, rng: random.Random) -> tuple[list, list]:
    """Take `share` of every stratum (at least one from strata with two or more rows)."""
    strata: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        strata[key(row)].append(row)
    taken, rest = [], []
    for name in sorted(strata):
        group = strata[name][:]
        rng.shuffle(group)
        count = round(len(group) * share)
        if count == 0 and len(group) >= 2:
            count = 1
        taken.extend(group[:count])
        rest.extend(group[count:])
    return taken, rest


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a recipe split; a bad line is an error naming the file and line."""
    if not path.is_file():
        raise RecipeError(f"{path}: missing")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        messages = row.get("messages") if isinstance(row, dict) else None
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
            or messages[-1]["role"] != "assistant"
        ):
            raise RecipeError(f"{path}:{number}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}}")
        rows.append(row)
    return rows


def synthesize_recipe(
    corpus_rows: list[dict],
    out_dir: Path,
    *,
    task: str,
    tenant: str,
    namespace: str,
    corpus_cid: str,
    frozen_holdout: Path,
    seed: int = 0,
) -> Recipe:
    """Write a recipe directory for a corpus. The hold-out is made once per namespace at
    `frozen_holdout` and reused unchanged afterwards; its inputs never reach train or eval."""
    if len(corpus_rows) < 10:
        raise RecipeError(f"corpus has {len(corpus_rows)} pairs; a recipe needs at least 10")
    rng = random.Random(seed)
    kind, extra = detect_output_kind(corpus_rows)
    stratum = answer if kind == "categorical" else (lambda row: "all")
    if frozen_holdout.is_file():
        holdout = read_jsonl(frozen_holdout)
        holdout_keys = {input_key(row["messages"][:-1]) for row in holdout}
        pool = [row for row in corpus_rows if input_key(row["messages"][:-1]) not in holdout_keys]
        holdout_made = False
    else:
        holdout, pool = _stratified_split(corpus_rows, HOLDOUT_SHARE, stratum, rng)
        holdout_made = True
    eval_rows, train_rows = _stratified_split(pool, EVAL_SHARE, stratum, rng)
    rng.shuffle(train_rows)
    if kind == "categorical":
        labels = sorted({answer(row) for row in corpus_rows} | {answer(row) for row in holdout})
        extra = {"labels": labels}
    spec = {
        "format": RECIPE_FORMAT,
        "task": task,
        "tenant": tenant,
        "namespace": namespace,
        "output_kind": kind,
        "verifier": VERIFIER_FOR_KIND[kind],
        **extra,
        "k_floor": DEFAULT_K_FLOOR,
        "corpus_cid": corpus_cid,
        "counts": {"train": len(train_rows), "eval": len(eval_rows), "holdout": len(holdout)},
        "max_new_tokens": 128,
    }
    diagnostics = {
        "output_kind": kind,
        "why": _kind_reason(kind, corpus_rows, extra),
        "k_floor": {"value": DEFAULT_K_FLOOR, "reasoning": "default floor; no purity estimate applied"},
        "holdout": {"frozen_at": str(frozen_holdout), "made_now": holdout_made, "size": len(holdout)},
        "split": {"strategy": "stratified by label" if kind == "categorical" else "random",
                  "eval_share": EVAL_SHARE, "holdout_share": HOLDOUT_SHARE, "seed": seed},
    }
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    _write_jsonl(staging / "train.jsonl", train_rows)
    _write_jsonl(staging / "eval.jsonl", eval_rows)
    _write_jsonl(staging / "holdout.jsonl", holdout)
    (staging / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2, sort_keys=True))
    if holdout_made:
        frozen_holdout.parent.mkdir(parents=True, exist_ok=True)
        tmp = frozen_holdout.with_name(frozen_holdout.name + ".tmp")
        shutil.copyfile(staging / "holdout.jsonl", tmp)
        os.replace(tmp, frozen_holdout)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return load_recipe(out_dir)


def _kind_reason(kind: str, rows: list[dict], extra: dict) -> str:
    if kind == "categorical":
        return f"{len(rows)} short outputs drawn from {len(extra['labels'])} distinct values"
    if kind == "json":
        return "every output parses as a JSON object"
    if kind == "extractive":
        return "every output occurs verbatim in its input"
    return "outputs are varied free text"


def load_recipe(path: Path) -> Recipe:
    """Load and validate a recipe directory (synthesised or hand-written)."""
    path = Path(path)
    spec_path = path / "spec.json"
    if not spec_path.is_file():
        raise RecipeError(f"{spec_path}: missing (a recipe directory needs spec.json)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{spec_path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    try:
        jsonschema.validate(spec, SPEC_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise RecipeError(f"{spec_path}: {where}: {exc.message}") from exc
    recipe = Recipe(
        path=path,
        spec=spec,
        train=read_jsonl(path / "train.jsonl"),
        eval=read_jsonl(path / "eval.jsonl"),
        holdout=read_jsonl(path / "holdout.jsonl") if (path / "holdout.jsonl").exists() else [],
    )
    return recipe


def dry_run(path: Path, min_train: int = 10) -> list[str]:
    """Problems that would stop a compile, without training; empty when the recipe is ready."""
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        return [str(exc)]
    problems = []
    if len(recipe.train) < min_train:
        problems.append(f"{path / 'train.jsonl'}: {len(recipe.train)} pairs, need at least {min_train}")
    if not recipe.eval:
        problems.append(f"{path / 'eval.jsonl'}: no eval pairs")
    labels = recipe.labels
    if labels:
        for split, rows in (("train", recipe.train), ("eval", recipe.eval)):
            stray = sorted({answer(row) for row in rows} - set(labels))
            if stray:
                problems.append(f"{path / (split + '.jsonl')}: answers outside the label set: {stray[:5]}")
    return problems

