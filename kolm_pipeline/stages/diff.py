"""What changed between two versions of a task: data, recipe, K-score parts and the eval cases that flipped.

A version is a published ``.kolm`` (by CID or path), the candidate the last evaluation left in the
namespace's work directory (not packaged yet), or the bare base. Scores come from the evaluations the
versions carry (``evals.json``, which is the evaluation stage's ``evaluation.json``): when one version was
evaluated against the other, side by side in one run, that run's numbers are used, so both sides were
measured on the same eval split; otherwise each version's own evaluation, and verdicts are compared only on
the cases both eval splits hold (matched by input key).

Evaluations hold no text (they ship in every ``.kolm``); `kolm registry diff` shows the cases' texts from the
namespace's ``case_previews.json`` while retention keeps it, for the evaluation it belongs to. The Markdown for
Dagster never shows them: Dagster's event log is not swept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kolm_pipeline.evaluate.result import CasePreviews
from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
from kolm_pipeline.registry.artifact import KolmArtifact
from kolm_pipeline.registry.manage import known_task, local_artifact, verified_artifact
from kolm_pipeline.registry.provenance import _stage_predicates, composition_line  # one reading of receipts
from kolm_pipeline.registry.refs import (
    CURRENT,
    KIND_ARTIFACT,
    KIND_BASE,
    KIND_CANDIDATE,
    NAMES,
    PREVIOUS,
    SERVING_DECISIONS,
    VersionRef,
    resolve_ref,
)
from kolm_pipeline.registry.swap import validate_task
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.workdir import NamespaceWorkdir

CANDIDATE = "candidate"
BASE = "base"
LISTED_CASES = 20
K_PARTS = (("A", "accuracy"), ("S", "size"), ("L", "latency"), ("C", "cost"), ("V", "coverage"), ("K", "k"))
RECIPE_FIELDS = ("output_kind", "verifier", "labels", "k_floor", "counts", "max_new_tokens", "json_schema",
                 "holdout_cid")


class DiffError(RegistryError):
    """A diff cannot be made (unknown task or version, nothing to compare); the message says which."""


@dataclass(frozen=True)
class Version:
    """One side of a diff: what the version was made from, and the evaluation that measured it.

    ``side`` names the side of ``evaluation`` that describes this version (the candidate side: a version's
    own evaluation measured it as the candidate). ``ref`` is how other evaluations name it as their current
    side: its CID, ``base`` for the bare base, None for a candidate that is not packaged yet. ``name`` is how
    the user asked for it (``current``, a CID prefix, a path), when it was asked for."""

    label: str
    cid: str | None = None
    is_base: bool = False
    name: str | None = None
    corpus_cid: str | None = None
    corpus_pairs: int | None = None
    recipe_cid: str | None = None
    adapter_cid: str | None = None
    recipe: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    composition: dict[str, Any] | None = None  # the parts of a `kolm compose` artifact

    @property
    def ref(self) -> str | None:
        return BASE if self.is_base else self.cid

    def describe(self) -> str:
        """The version in words, with the name it was asked for: ``artifact bafkrei… (current)``."""
        if self.is_base:
            return "the bare base"
        if self.cid is None:
            return "the last evaluated candidate (not packaged)"
        named = f" ({self.name})" if self.name and self.name != self.cid else ""
        return f"artifact {self.cid}{named}"


BARE_BASE = Version(label="(bare base)", is_base=True)


@dataclass(frozen=True)
class KPart:
    name: str
    label: str
    before: float | None
    after: float | None

    @property
    def delta(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


@dataclass(frozen=True)
class FieldChange:
    """One recipe field that differs; ``summary`` says how in words (labels added and removed, …)."""

    name: str
    before: Any
    after: Any
    summary: str


@dataclass(frozen=True)
class CaseFlip:
    """An eval case whose verdict changed between the versions."""

    key: str
    input: str
    expected: str
    before_output: str
    after_output: str
    before_score: float
    after_score: float


@dataclass(frozen=True)
class VersionDiff:
    task: str
    before: Version
    after: Version
    basis: str
    kscore: list[KPart]
    recipe_changes: list[FieldChange]
    compared: int | None
    only_before: int
    only_after: int
    improved: list[CaseFlip]
    regressed: list[CaseFlip]
    notes: list[str] = field(default_factory=list)

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        """Plain JSON (``kolm registry diff --json``); ``limit`` caps the listed cases, never the counts."""
        limit = None if limit is None else max(0, limit)

        def side(version: Version) -> dict[str, Any]:
            return {"label": version.label, "cid": version.cid, "corpus_cid": version.corpus_cid,
                    "corpus_pairs": version.corpus_pairs, "recipe_cid": version.recipe_cid,
                    "adapter_cid": version.adapter_cid, "composition": version.composition}

        return {
            "task": self.task,
            "before": side(self.before),
            "after": side(self.after),
            "basis": self.basis,
            "kscore": [{"part": p.name, "name": p.label, "before": p.before, "after": p.after,
                        "delta": None if p.delta is None else round(p.delta, 4)}
                       for p in self.kscore],
            "recipe_changes": [asdict(change) for change in self.recipe_changes],
            "cases": {"compared": self.compared, "only_before": self.only_before, "only_after": self.only_after,
                      "improved_count": len(self.improved), "regressed_count": len(self.regressed),
                      "improved": [asdict(f) for f in self.improved[:limit]],
                      "regressed": [asdict(f) for f in self.regressed[:limit]]},
            "notes": self.notes,
        }


# --- loading versions -------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def version_from_artifact(artifact: KolmArtifact, cid: str) -> Version:
    """A published version. Artifacts evaluated before the evaluation recorded the recipe spec and corpus
    size fall back to the manifest and the recipe and corpus receipts."""
    manifest, evals = artifact.manifest, artifact.evals
    stages = _stage_predicates(artifact)
    recipe = evals.get("recipe_spec") if isinstance(evals.get("recipe_spec"), dict) else None
    if recipe is None:
        recipe_receipt = stages.get("recipe", {})
        recipe = {"output_kind": manifest.get("output_kind") or recipe_receipt.get("output_kind"),
                  "verifier": manifest.get("verifier"), "labels": manifest.get("labels"),
                  "k_floor": recipe_receipt.get("k_floor", _dict(evals.get("decision")).get("k_floor")),
                  "counts": recipe_receipt.get("counts"), "holdout_cid": recipe_receipt.get("holdout_cid")}
    pairs = _int(_dict(evals.get("corpus")).get("pairs"))
    if pairs is None:
        pairs = _int(_dict(stages.get("corpus", {}).get("stats")).get("written"))
    composition = manifest.get("composition") if isinstance(manifest.get("composition"), dict) else None
    return Version(label=cid, cid=cid, corpus_cid=manifest.get("corpus_cid"), corpus_pairs=pairs,
                   recipe_cid=manifest.get("recipe_cid"), adapter_cid=manifest.get("adapter_cid"),
                   recipe=recipe, evaluation=evals, composition=composition)


def version_from_evaluation(evaluation: dict[str, Any], label: str = CANDIDATE) -> Version:
    """The candidate of an evaluation stage's output, before it is packaged (the ``evaluation`` asset)."""
    corpus = _dict(evaluation.get("corpus"))
    spec = _dict(evaluation.get("recipe_spec"))
    return Version(label=label, corpus_cid=corpus.get("cid") or spec.get("corpus_cid"),
                   corpus_pairs=_int(corpus.get("pairs")), recipe_cid=evaluation.get("recipe_cid"),
                   adapter_cid=evaluation.get("adapter_cid"), recipe=spec or None, evaluation=evaluation)


def load_artifact_version(settings: Settings, task: str, ref: str) -> Version:
    """A published version of ``task`` by CID (fetched from the object store if needed) or a ``.kolm``
    path, after checking its signatures: a diff is read to decide, so it only shows what verifies."""
    path = Path(ref)
    if ref.endswith(".kolm") or path.is_file():
        artifact, cid = verified_artifact(settings, path)
    else:
        artifact, cid = verified_artifact(settings, local_artifact(settings, task, ref))
    if artifact.manifest.get("task") != task:
        raise DiffError(f"{ref} is an artifact of task {artifact.manifest.get('task')!r}, not {task!r}")
    return version_from_artifact(artifact, cid)


def load_candidate_version(settings: Settings, task: str, store=None) -> Version:
    """The candidate the namespace's last evaluation measured (its ``evaluation.json``, the newest published one
    with a store)."""
    workdir = NamespaceWorkdir(settings, task, store=store)
    workdir.pull_latest("evaluation")
    path = workdir.evaluation
    if not path.is_file():
        raise DiffError(f"{task}: no evaluated candidate ({path} does not exist); materialize up to "
                        "`evaluation` first")
    try:
        evaluation = json.loads(path.read_text())
    except ValueError as exc:
        raise DiffError(f"{path}: not JSON ({exc})") from None
    if not isinstance(evaluation, dict) or evaluation.get("task") != task:
        raise DiffError(f"{path}: not an evaluation of task {task!r}")
    return version_from_evaluation(evaluation)


def load_version(settings: Settings, store, task: str, ref: str) -> Version:
    """A ``.kolm`` path, or any reference the registry's resolver reads (``current``, ``previous``, ``base``,
    ``candidate``, a CID or a unique CID prefix); the version remembers the name it was given."""
    if ref not in NAMES and (ref.endswith(".kolm") or Path(ref).is_file()):
        return replace(load_artifact_version(settings, task, ref), name=ref)
    resolved = resolve_ref(settings, store, ref, task)
    if resolved.kind == KIND_BASE:
        return replace(BARE_BASE, name=ref)
    if resolved.kind == KIND_CANDIDATE:
        return replace(load_candidate_version(settings, task, store), name=ref)
    return replace(load_artifact_version(settings, task, str(resolved.cid)), name=ref)


def _first_served(rows: list, cid: str | None) -> int | None:
    """The registry row that first put ``cid`` into service (rows are numbered in time order)."""
    served = [row.id for row in rows if row.decision in SERVING_DECISIONS and row.to_cid == cid]
    return min(served) if served else None


def older_than(rows: list, version: Version, other: Version) -> bool:
    """Whether ``version`` came before ``other``: the bare base before everything, the unpackaged candidate after
    everything, artifacts in the order they first served (one never served counts as newer: a candidate)."""
    if version.is_base or other.ref is None:
        return not other.is_base
    if other.is_base or version.ref is None:
        return False
    mine, theirs = _first_served(rows, version.cid), _first_served(rows, other.cid)
    return mine is not None and (theirs is None or mine < theirs)


def registry_diff(settings: Settings, store, task: str, refs: list[str] | tuple[str, ...] = ()) -> VersionDiff:
    """``kolm registry diff --task T [FROM] [TO]``, always read old → new: no version → ``previous`` to
    ``current`` (the bare base to the current one after the first deployment); one → that version and the
    current one, the older first (``base``, ``previous`` and earlier deployments before it, ``candidate`` and
    versions never deployed after it); two → the first to the second, as given."""
    validate_task(task)
    if len(refs) > 2:
        raise DiffError(f"give at most two versions to compare, not {len(refs)}")
    workdir = NamespaceWorkdir(settings, task, store=store)
    if not known_task(settings, store, task) and not workdir.pull_latest("evaluation"):
        raise DiffError(f"unknown task {task!r}: nothing was ever published, deployed or evaluated for it")
    if len(refs) < 2 and resolve_current(settings, store, task) is None:
        raise DiffError(f"{task}: nothing is deployed, so there is no current version; give two versions "
                        "(`base`, `candidate`, CIDs, CID prefixes or .kolm paths)")
    workdir.pull_latest("previews")
    previews = CasePreviews.read(workdir.case_previews)

    def load(ref: str) -> Version:
        return with_previews(load_version(settings, store, task, ref), previews)

    if len(refs) == 2:
        before, after = load(refs[0]), load(refs[1])
    elif len(refs) == 1:
        current, other = load(CURRENT), load(refs[0])
        before, after = (other, current) if older_than(store.registry_rows(task), other, current) else (current, other)
    else:
        before, after = load(PREVIOUS), load(CURRENT)
    if before.ref is not None and before.ref == after.ref:
        raise DiffError(f"nothing to diff: both versions are {before.describe()}")
    if before.adapter_cid and before.adapter_cid == after.adapter_cid:
        deployed = " (it was deployed already)" if before.ref is None or after.ref is None else ""
        raise DiffError(f"nothing to diff: {before.describe()} and {after.describe()} hold the same adapter "
                        f"{after.adapter_cid}{deployed}; compare `previous` with `current`, or run a new distill")
    return diff_versions(before, after, task=task)


def resolve_current(settings: Settings, store, task: str) -> VersionRef | None:
    """The task's current version, None when nothing is deployed."""
    try:
        return resolve_ref(settings, store, CURRENT, task, allow=(KIND_ARTIFACT,))
    except DeployRefused:
        return None


def with_previews(version: Version, previews: CasePreviews | None) -> Version:
    """``version`` with the case texts of ``previews`` added to its evaluation's verdicts, when they belong to
    that evaluation (same adapter, same current side, same cases in the same order)."""
    evaluation = version.evaluation
    cases = _dict(_dict(evaluation).get("case_verdicts")).get("cases")
    if previews is None or evaluation is None or not previews.belongs_to(evaluation) or not isinstance(cases, list):
        return version
    if [case.get("key") if isinstance(case, dict) else None for case in cases] != [p.key for p in previews.cases]:
        return version
    merged = [
        {**case, "input": texts.input, "expected": texts.expected,
         **{side: {**case[side], "output": output} for side, output in texts.outputs.items()
            if isinstance(case.get(side), dict)}}
        for case, texts in zip(cases, previews.cases, strict=True)
    ]
    verdicts = {**evaluation["case_verdicts"], "cases": merged}
    return replace(version, evaluation={**evaluation, "case_verdicts": verdicts})


def candidate_diff(settings: Settings, evaluation: dict[str, Any]) -> VersionDiff:
    """The ``evaluation`` asset's table: the version it measured as current (the champion, or the bare
    base) → its candidate. Every score comes from this one evaluation; the champion's artifact adds only
    its corpus and recipe, and a champion whose artifact cannot be read is still compared."""
    after = version_from_evaluation(evaluation)
    task = str(evaluation.get("task"))
    current_cid = evaluation.get("current_cid")
    if current_cid is None:
        return diff_versions(BARE_BASE, after, task=task)
    try:
        before = load_artifact_version(settings, task, current_cid)
    except (RegistryError, DeployRefused) as exc:
        before = Version(label=current_cid, cid=current_cid)
        return diff_versions(before, after, task=task, notes=[f"champion artifact unreadable: {exc}"])
    return diff_versions(before, after, task=task)


# --- comparing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Measured:
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    before_cases: dict[str, dict[str, Any]] | None
    after_cases: dict[str, dict[str, Any]] | None
    basis: str


def _evaluated_against(version: Version, other: Version) -> bool:
    """Whether ``version``'s own evaluation measured ``other`` as its current side."""
    evaluation = version.evaluation
    if evaluation is None or other.ref is None:
        return False
    current = evaluation.get("current_cid") or (BASE if evaluation.get("current_name") == BASE else None)
    return current == other.ref


def _verdicts(evaluation: dict[str, Any] | None, side: str) -> dict[str, dict[str, Any]] | None:
    """Case key → that side's verdict (with the case's input and expected previews); None if not recorded."""
    block = _dict(_dict(evaluation).get("case_verdicts"))
    cases = block.get("cases")
    if not isinstance(cases, list):
        return None
    verdicts: dict[str, dict[str, Any]] = {}
    for case in cases:
        verdict = case.get(side) if isinstance(case, dict) else None
        if not isinstance(verdict, dict) or not isinstance(case.get("key"), str):
            return None
        key, copy = case["key"], 2
        while key in verdicts:  # the same input twice in one split: match occurrences in order
            key, copy = f"{case['key']}#{copy}", copy + 1
        verdicts[key] = {"input": case.get("input", ""), "expected": case.get("expected", ""), **verdict}
    return verdicts


def _measure(before: Version, after: Version) -> _Measured:
    if _evaluated_against(after, before):
        evaluation = after.evaluation or {}
        return _Measured(_dict(evaluation.get("current")), _dict(evaluation.get(CANDIDATE)),
                         _verdicts(evaluation, "current"), _verdicts(evaluation, CANDIDATE),
                         f"side by side in the evaluation of {after.label} (same eval split, same run)")
    if _evaluated_against(before, after):
        evaluation = before.evaluation or {}
        return _Measured(_dict(evaluation.get(CANDIDATE)), _dict(evaluation.get("current")),
                         _verdicts(evaluation, CANDIDATE), _verdicts(evaluation, "current"),
                         f"side by side in the evaluation of {before.label} (same eval split, same run)")
    return _Measured(
        _dict(before.evaluation.get(CANDIDATE)) if before.evaluation else None,
        _dict(after.evaluation.get(CANDIDATE)) if after.evaluation else None,
        _verdicts(before.evaluation, CANDIDATE) if before.evaluation else None,
        _verdicts(after.evaluation, CANDIDATE) if after.evaluation else None,
        "each version's own evaluation (different runs; verdicts compared on the cases both eval splits hold)",
    )


def _number(side: dict[str, Any] | None, key: str) -> float | None:
    value = (side or {}).get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _labels_summary(before: list[str], after: list[str]) -> str:
    added = [label for label in after if label not in before]
    removed = [label for label in before if label not in after]
    parts = [f"+{label}" for label in added] + [f"−{label}" for label in removed]
    return "labels " + ", ".join(parts) if parts else "labels reordered"


def _counts_summary(before: dict, after: dict) -> str:
    splits = dict.fromkeys(["train", "eval", "holdout", *sorted(before), *sorted(after)])
    parts = [f"{split} {before.get(split, 0)} → {after.get(split, 0)}"
             for split in splits if before.get(split) != after.get(split)]
    return "counts " + ", ".join(parts)


def _schema_summary(before: dict, after: dict) -> str:
    old, new = _dict(before.get("properties")), _dict(after.get("properties"))
    parts = [f"+{name}" for name in new if name not in old] + [f"−{name}" for name in old if name not in new]
    parts += [f"~{name}" for name in new if name in old and new[name] != old[name]]
    return "json_schema " + (", ".join(parts) if parts else "changed")


def recipe_changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> tuple[list[FieldChange], list[str]]:
    """Recipe fields that differ, and a note for fields one side does not record."""
    if before is None or after is None:
        return [], []
    changes, unrecorded = [], []
    for name in RECIPE_FIELDS:
        old, new = before.get(name), after.get(name)
        if name == "labels":
            old, new = old or [], new or []
        elif old is None and new is None:
            continue
        elif old is None or new is None:
            unrecorded.append(name)
            continue
        if old == new:
            continue
        if name == "labels":
            summary = _labels_summary(old, new)
        elif name == "counts" and isinstance(old, dict) and isinstance(new, dict):
            summary = _counts_summary(old, new)
        elif name == "json_schema" and isinstance(old, dict) and isinstance(new, dict):
            summary = _schema_summary(old, new)
        else:
            summary = f"{name} {old} → {new}"
        changes.append(FieldChange(name=name, before=old, after=new, summary=summary))
    notes = [f"recipe fields recorded by one version only: {', '.join(unrecorded)}"] if unrecorded else []
    return changes, notes


def _flips(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> tuple[list[CaseFlip], ...]:
    improved, regressed = [], []
    for key, old in before.items():
        new = after.get(key)
        if new is None or bool(old.get("pass")) == bool(new.get("pass")):
            continue
        flip = CaseFlip(key=key, input=new.get("input") or old.get("input", ""),
                        expected=new.get("expected") or old.get("expected", ""),
                        before_output=old.get("output", ""), after_output=new.get("output", ""),
                        before_score=float(old.get("score", 0.0)), after_score=float(new.get("score", 0.0)))
        (improved if new.get("pass") else regressed).append(flip)
    for flips in (improved, regressed):
        flips.sort(key=lambda f: (-abs(f.after_score - f.before_score), f.key))
    return improved, regressed


def diff_versions(before: Version, after: Version, *, task: str, notes: list[str] | None = None) -> VersionDiff:
    """Compare two versions of ``task`` (see the module docstring for where the numbers come from)."""
    measured = _measure(before, after)
    notes = list(notes or [])
    kscore = [KPart(name, label, _number(measured.before, label), _number(measured.after, label))
              for name, label in K_PARTS]
    for version, side in ((before, measured.before), (after, measured.after)):
        if not side and not version.is_base:
            notes.append(f"{version.label} carries no evaluation, so its K-score parts are unknown")
    changes, recipe_notes = recipe_changes(before.recipe, after.recipe)
    notes.extend(recipe_notes)
    if measured.before_cases is None or measured.after_cases is None:
        missing = before.label if measured.before_cases is None else after.label
        notes.append(f"{missing} records no per-case verdicts (evaluated before they were kept), so no flips")
        return VersionDiff(task=task, before=before, after=after, basis=measured.basis, kscore=kscore,
                           recipe_changes=changes, compared=None, only_before=0, only_after=0, improved=[],
                           regressed=[], notes=notes)
    shared = measured.before_cases.keys() & measured.after_cases.keys()
    improved, regressed = _flips(measured.before_cases, measured.after_cases)
    return VersionDiff(task=task, before=before, after=after, basis=measured.basis, kscore=kscore,
                       recipe_changes=changes, compared=len(shared),
                       only_before=len(measured.before_cases) - len(shared),
                       only_after=len(measured.after_cases) - len(shared),
                       improved=improved, regressed=regressed, notes=notes)


# --- rendering --------------------------------------------------------------------------------------------


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(value: float | None) -> str:
    if value is None:
        return ""
    return "0" if abs(value) < 5e-5 else f"{value:+.4f}".replace("-", "−")


def _pairs(value: int | None) -> str:
    return "?" if value is None else str(value)


def _change(before: Any, after: Any) -> str:
    if before is None or after is None:
        return ""
    if isinstance(before, int) and isinstance(after, int):
        return f"{after - before:+d}".replace("-", "−") if after != before else "same"
    return "same" if before == after else "changed"


def _rows(diff: VersionDiff) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) for the summary table shared by the text and markdown renderings."""
    b, a = diff.before, diff.after
    rows = [
        ("version", b.label, a.label, ""),
        ("corpus CID", b.corpus_cid or "-", a.corpus_cid or "-", _change(b.corpus_cid, a.corpus_cid)),
        ("corpus pairs", _pairs(b.corpus_pairs), _pairs(a.corpus_pairs), _change(b.corpus_pairs, a.corpus_pairs)),
        ("recipe CID", b.recipe_cid or "-", a.recipe_cid or "-", _change(b.recipe_cid, a.recipe_cid)),
    ]
    names = dict(K_PARTS)
    rows += [(f"{part.name} {names[part.name]}" if part.name != "K" else "K", _value(part.before),
              _value(part.after), _delta(part.delta)) for part in diff.kscore]
    return rows


def _cases_line(diff: VersionDiff) -> str:
    if diff.compared is None:
        return "eval cases: no per-case verdicts to compare"
    return (f"eval cases: {diff.compared} compared, {diff.only_before + diff.only_after} not comparable "
            f"(only before {diff.only_before}, only after {diff.only_after}); {len(diff.improved)} improved "
            f"(fail → pass), {len(diff.regressed)} regressed (pass → fail)")


def diff_text(diff: VersionDiff, limit: int = LISTED_CASES) -> str:
    """The CLI table; ``limit`` caps the cases listed per direction, never the counts."""
    limit = max(0, limit)
    rows = [("", "before", "after", "change"), *_rows(diff)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [f"{diff.task}: {diff.before.label} → {diff.after.label}"]
    named = [f"{side} is {version.name}" for side, version in (("before", diff.before), ("after", diff.after))
             if version.name and version.name != version.label]
    if named:
        lines.append(f"old → new: {', '.join(named)}")
    for side, version in (("before", diff.before), ("after", diff.after)):
        if (parts := composition_line(version.composition)) is not None:
            lines.append(f"{side} {parts}")
    lines += [f"measured: {diff.basis}", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines.append("")
    lines.append("recipe changes:" if diff.recipe_changes else "recipe changes: none")
    lines += [f"  {change.summary}" for change in diff.recipe_changes]
    lines.append(_cases_line(diff))
    for title, flips in (("regressed (pass → fail)", diff.regressed), ("improved (fail → pass)", diff.improved)):
        if not flips:
            continue
        lines.append(f"{title}, {min(limit, len(flips))} of {len(flips)}:")
        for flip in flips[:limit]:
            line = f"  {flip.key}  score {flip.before_score:.2f} → {flip.after_score:.2f}"
            if not (flip.input or flip.expected or flip.before_output or flip.after_output):
                lines.append(line + "  (texts not kept: past retention, or from another evaluation)")
                continue
            lines.append(f"{line}  input {json.dumps(flip.input, ensure_ascii=False)}")
            lines.append(f"      expected {json.dumps(flip.expected, ensure_ascii=False)}; "
                         f"before {json.dumps(flip.before_output, ensure_ascii=False)} → "
                         f"after {json.dumps(flip.after_output, ensure_ascii=False)}")
    lines += [f"note: {note}" for note in diff.notes]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def diff_markdown(diff: VersionDiff, limit: int = LISTED_CASES) -> str:
    """The same table as Markdown, for Dagster metadata (``dg.MarkdownMetadataValue``): cases by key and score
    only, since Dagster's event log outlives the retention window (``kolm registry diff`` shows the texts)."""
    limit = max(0, limit)
    lines = [f"**{_cell(diff.task)}**: `{_cell(diff.before.label)}` → `{_cell(diff.after.label)}`",
             "", f"Measured {_cell(diff.basis)}.", "", "| | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {_cell(what)} | {_cell(old)} | {_cell(new)} | {_cell(change)} |"
              for what, old, new, change in _rows(diff)[1:]]
    lines += ["", "**Recipe changes:** " + ("none" if not diff.recipe_changes else
                                             "; ".join(_cell(change.summary) for change in diff.recipe_changes))]
    lines += ["", f"**{_cell(_cases_line(diff))}**"]
    for title, flips in (("Regressed (pass → fail)", diff.regressed), ("Improved (fail → pass)", diff.improved)):
        if not flips:
            continue
        lines += ["", f"{title}, {min(limit, len(flips))} of {len(flips)}", "", "| case | score |", "|---|---|"]
        lines += [f"| `{flip.key}` | {flip.before_score:.2f} → {flip.after_score:.2f} |" for flip in flips[:limit]]
    if diff.improved or diff.regressed:
        lines += ["", f"Texts of the cases: `kolm registry diff --task {_cell(diff.task)}` (while retention keeps "
                      "them)."]
    if diff.notes:
        lines += ["", *[f"- {_cell(note)}" for note in diff.notes]]
    return "\n".join(lines)
