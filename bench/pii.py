"""Recall and precision of PII redaction on a labelled set: the default redactor (every entity) runs over each
line's text, and the result is compared with the line's labels.

    .venv/bin/python bench/pii.py                    # kolm_pipeline_tests/fixtures/pii_labelled.jsonl
    .venv/bin/python bench/pii.py --set FILE.jsonl   # another set, same format
    .venv/bin/python bench/pii.py --errors           # also list each miss and each false alarm

Each line is `{"text": ..., "entities": [{"type": "EMAIL", "value": ...}, ...]}`; a line with no entities is a
hard negative. A labelled value counts as found when it no longer appears in the redacted text and a
placeholder of its type (`<EMAIL>`) does; a placeholder beyond the values of its type found on that line is
a false alarm. Recall is found / labelled, precision is found / placeholders. docs/pii.md reports the
figures; kolm_pipeline_tests/test_trust_pii.py fails when either falls below 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_pipeline.capture.redact import Redactor  # noqa: E402

DEFAULT_SET = ROOT / "kolm_pipeline_tests" / "fixtures" / "pii_labelled.jsonl"


@dataclass(frozen=True)
class Entity:
    type: str
    value: str


@dataclass(frozen=True)
class Case:
    text: str
    entities: tuple[Entity, ...]


@dataclass
class Counts:
    labelled: int = 0
    found: int = 0
    placeholders: int = 0

    @property
    def recall(self) -> float:
        return self.found / self.labelled if self.labelled else 1.0

    @property
    def precision(self) -> float:
        return self.found / self.placeholders if self.placeholders else 1.0


@dataclass
class Score:
    by_entity: dict[str, Counts]
    overall: Counts
    errors: list[str] = field(default_factory=list)


def load(path: Path) -> list[Case]:
    """The labelled set, one case per non-empty line."""
    cases = []
    for line in Path(path).read_text("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            entities = tuple(Entity(item["type"], item["value"]) for item in row["entities"])
            cases.append(Case(row["text"], entities))
    return cases


def score(redactor: Redactor, cases: Iterable[Case]) -> Score:
    """Found, labelled and placeholder counts per entity type, over every case."""
    by_entity = {entity: Counts() for entity in sorted(redactor.entities)}
    errors = []
    for case in cases:
        redacted = redactor.text(case.text)
        labelled = Counter(entity.type for entity in case.entities)
        gone = Counter(entity.type for entity in case.entities if entity.value not in redacted)
        for entity, counts in by_entity.items():
            placeholder = f"<{entity}>"
            placed = redacted.count(placeholder) - case.text.count(placeholder)
            found = min(gone[entity], placed)
            counts.labelled += labelled[entity]
            counts.found += found
            counts.placeholders += placed
            if found < labelled[entity]:
                errors.append(f"missed {entity} x{labelled[entity] - found}: {case.text!r} -> {redacted!r}")
            if found < placed:
                errors.append(f"false {entity} x{placed - found}: {case.text!r} -> {redacted!r}")
    overall = Counts(
        sum(c.labelled for c in by_entity.values()),
        sum(c.found for c in by_entity.values()),
        sum(c.placeholders for c in by_entity.values()),
    )
    return Score(by_entity, overall, errors)


def table(result: Score) -> str:
    """The figures as a Markdown table, as docs/pii.md shows them."""
    rows = ["| entity | labelled | found | placeholders | recall | precision |", "|---|---:|---:|---:|---:|---:|"]
    named = [*result.by_entity.items(), ("**overall**", result.overall)]
    for name, c in named:
        rows.append(f"| {name} | {c.labelled} | {c.found} | {c.placeholders} | {c.recall:.3f} | {c.precision:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="labelled JSONL (default: %(default)s)")
    parser.add_argument("--errors", action="store_true", help="list each miss and each false alarm")
    args = parser.parse_args(argv)
    cases = load(args.set)
    result = score(Redactor(), cases)
    negatives = sum(1 for case in cases if not case.entities)
    print(f"{len(cases)} lines ({negatives} with no PII), {result.overall.labelled} labelled values")
    print(table(result))
    if args.errors:
        print("\n".join(result.errors) if result.errors else "no misses, no false alarms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
