"""Regenerate the public-data subsets `bench/quality.py` runs on, deterministically, from the two source
repositories at pinned commits (a bare mirror or a checkout; files are read with `git show COMMIT:PATH`):

    .venv/bin/python bench/data/make_subsets.py --clinc PATH/TO/clinc/oos-eval --snips PATH/TO/sonos/nlu-benchmark

Writes, one JSON object per line `{"text": ..., "answer": ...}` (the answer a 100%-correct teacher gives):

  clinc150/clinc20.train.jsonl    800  20 intents (banking's 15 + 5 of credit_cards) x 40, from `train`
  clinc150/clinc20.heldout.jsonl  800  the same 20 intents x 40, from `val` + `test` (never in train)
  clinc150/all.train.jsonl      3,900  all 150 in-scope intents x 26, from `train`
  clinc150/all.heldout.jsonl      770  all 150 intents, 5 each + 1 more for 20 of them, from `test`
  snips/json.train.jsonl        1,039  SNIPS 2017-06 custom-intent-engines, `train_*_full.json`
  snips/json.heldout.jsonl        400  from `validate_*.json` (disjoint from the training files)

The SNIPS answers are JSON objects `{"intents": [...], "slots": {name: span}}`. A share of the messages
(JOINED_SHARE) are two requests of different intents joined into one message ("... and ...", as MixSNIPS
does), so intents are multi-label; utterances that name one slot twice are left out (a slot maps to one
span), and two utterances are only joined when their slot names differ. Every draw uses a seeded
`random.Random`, so the files are the same on every run; texts are unique within and across the splits of a
set (after lower-casing and collapsing white space). Out-of-scope (`oos`) queries are not used.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLINC_COMMIT = "828f8093932c8fe6ca7936c3d2e52903b1c523de"
SNIPS_COMMIT = "b86ac7f1577868c42158d0dec77db50956046696"
SEED = 21  # issue 21
CLINC20_DOMAIN = "banking"
CLINC20_EXTRA_DOMAIN = "credit_cards"
CLINC20_INTENTS = 20
CLINC20_TRAIN, CLINC20_HELDOUT = 40, 40
CLINC_ALL_TRAIN, CLINC_ALL_HELDOUT = 26, 770
SNIPS_DIR = "2017-06-custom-intent-engines"
SNIPS_INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
                 "SearchScreeningEvent")
SNIPS_TRAIN, SNIPS_HELDOUT = 1039, 400
JOINED_SHARE = 0.35
JOINERS = (" and ", ", and also ", ". Also, ", "; then ")


def git_show(repo: Path, commit: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"  {path.relative_to(HERE)}: {len(rows)} rows")


def unique_by_text(pairs: list[list[str]], taken: set[str]) -> dict[str, list[str]]:
    """Texts per intent, first occurrence only, skipping any text already taken by another split and any text
    the source gives two different intents."""
    intents_of: dict[str, set[str]] = defaultdict(set)
    for text, intent in pairs:
        intents_of[normal(text)].add(intent)
    by_intent: dict[str, list[str]] = defaultdict(list)
    seen = set(taken)
    for text, intent in pairs:
        key = normal(text)
        if key in seen or len(intents_of[key]) > 1:
            continue
        seen.add(key)
        by_intent[intent].append(" ".join(text.split()))
    return by_intent


def clinc(repo: Path) -> None:
    data = json.loads(git_show(repo, CLINC_COMMIT, "data/data_full.json"))
    domains = json.loads(git_show(repo, CLINC_COMMIT, "data/domains.json"))
    rng = random.Random(SEED)
    extra = sorted(domains[CLINC20_EXTRA_DOMAIN])
    rng.shuffle(extra)
    intents20 = sorted(domains[CLINC20_DOMAIN]) + sorted(extra[: CLINC20_INTENTS - len(domains[CLINC20_DOMAIN])])
    intents_all = sorted({intent for _, intent in data["train"]})
    assert len(intents_all) == 150 and "oos" not in intents_all

    def draw(intents: list[str], source: list[list[str]], per_intent: int | dict[str, int], taken: set[str],
             rng: random.Random) -> list[dict]:
        by_intent = unique_by_text(source, taken)
        rows = []
        for intent in intents:
            texts = sorted(by_intent[intent])
            rng.shuffle(texts)
            want = per_intent if isinstance(per_intent, int) else per_intent[intent]
            if len(texts) < want:
                raise SystemExit(f"clinc: intent {intent} has {len(texts)} unique texts, {want} wanted")
            rows += [{"text": text, "answer": intent} for text in texts[:want]]
        rng.shuffle(rows)
        return rows

    rng = random.Random(SEED)
    train20 = draw(intents20, data["train"], CLINC20_TRAIN, set(), rng)
    held20 = draw(intents20, data["val"] + data["test"], CLINC20_HELDOUT, {normal(r["text"]) for r in train20}, rng)
    rng = random.Random(SEED + 1)
    train_all = draw(intents_all, data["train"], CLINC_ALL_TRAIN, set(), rng)
    base, extra_count = divmod(CLINC_ALL_HELDOUT, len(intents_all))
    plus_one = set(rng.sample(intents_all, extra_count))
    counts = {intent: base + (intent in plus_one) for intent in intents_all}
    held_all = draw(intents_all, data["test"], counts, {normal(r["text"]) for r in train_all}, rng)
    out = HERE / "clinc150"
    write_jsonl(out / "clinc20.train.jsonl", train20)
    write_jsonl(out / "clinc20.heldout.jsonl", held20)
    write_jsonl(out / "all.train.jsonl", train_all)
    write_jsonl(out / "all.heldout.jsonl", held_all)
    (out / "LICENSE").write_bytes(git_show(repo, CLINC_COMMIT, "LICENSE"))
    print(f"  clinc20 intents: {', '.join(intents20)}")


def snips_utterances(repo: Path, file_pattern: str) -> list[dict]:
    """Every utterance of the seven intents in one kind of file: text, intent and its slots in order."""
    utterances = []
    for intent in SNIPS_INTENTS:
        path = f"{SNIPS_DIR}/{intent}/{file_pattern.format(intent=intent)}"
        # train_PlayMusic_full.json writes six emoji as UTF-8-encoded surrogate halves (CESU-8): decoded with
        # surrogatepass, then the halves are paired back into the characters they stand for.
        text = git_show(repo, SNIPS_COMMIT, path).decode("utf-8", "surrogatepass")
        document = json.loads(text.encode("utf-16", "surrogatepass").decode("utf-16"))
        for query in document[intent]:
            chunks = query["data"]
            text = "".join(chunk["text"] for chunk in chunks)
            slots = [(chunk["entity"], chunk["text"].strip()) for chunk in chunks if chunk.get("entity")]
            names = [name for name, _ in slots]
            if not text.strip() or len(names) != len(set(names)) or any(not span for _, span in slots):
                continue  # a slot named twice has no single span; an empty span is a labelling slip
            utterances.append({"text": " ".join(text.split()), "intent": intent, "slots": slots})
    return utterances


def join(first: dict, second: dict, joiner: str) -> dict:
    """Two requests in one message; the second's first letter is lower-cased unless a slot or "I" starts it."""
    head = first["text"]
    if not any(head.endswith(span) for _, span in first["slots"]):
        head = head.rstrip(" .?!")
    tail = second["text"]
    starts_slot = any(tail.startswith(span) for _, span in second["slots"])
    first_word = tail.split()[0]
    if not starts_slot and not joiner.startswith(".") and not (first_word == "I" or first_word.startswith("I'")):
        tail = tail[0].lower() + tail[1:]
    return {"text": head + joiner + tail, "intents": [first["intent"], second["intent"]],
            "slots": first["slots"] + second["slots"]}


def snips_messages(utterances: list[dict], count: int, rng: random.Random, taken: set[str]) -> list[dict]:
    pool = sorted(utterances, key=lambda u: (u["intent"], u["text"]))
    rng.shuffle(pool)
    by_intent: dict[str, list[dict]] = defaultdict(list)
    for utterance in pool:
        by_intent[utterance["intent"]].append(utterance)
    cursor = dict.fromkeys(SNIPS_INTENTS, 0)
    seen = set(taken)

    def take(intent: str) -> dict:
        while cursor[intent] < len(by_intent[intent]):
            utterance = by_intent[intent][cursor[intent]]
            cursor[intent] += 1
            if normal(utterance["text"]) not in seen:
                seen.add(normal(utterance["text"]))
                return utterance
        raise SystemExit(f"snips: ran out of {intent} utterances")

    rows = []
    while len(rows) < count:
        if rng.random() < JOINED_SHARE:
            first_intent, second_intent = rng.sample(SNIPS_INTENTS, 2)
            first, second = take(first_intent), take(second_intent)
            if {n for n, _ in first["slots"]} & {n for n, _ in second["slots"]}:
                message = {"text": first["text"], "intents": [first["intent"]], "slots": first["slots"]}
                rows.append(message)
                if len(rows) < count:
                    rows.append({"text": second["text"], "intents": [second["intent"]], "slots": second["slots"]})
                continue
            rows.append(join(first, second, rng.choice(JOINERS)))
        else:
            single = take(rng.choice(SNIPS_INTENTS))
            rows.append({"text": single["text"], "intents": [single["intent"]], "slots": single["slots"]})
    return [{"text": row["text"], "answer": {"intents": row["intents"], "slots": dict(row["slots"])}}
            for row in rows]


def snips(repo: Path) -> None:
    rng = random.Random(SEED)
    train = snips_messages(snips_utterances(repo, "train_{intent}_full.json"), SNIPS_TRAIN, rng, set())
    validate = snips_utterances(repo, "validate_{intent}.json")
    held = snips_messages(validate, SNIPS_HELDOUT, rng, {normal(row["text"]) for row in train})
    out = HERE / "snips"
    write_jsonl(out / "json.train.jsonl", train)
    write_jsonl(out / "json.heldout.jsonl", held)
    (out / "LICENSE").write_bytes(git_show(repo, SNIPS_COMMIT, "LICENSE"))
    slot_names = sorted({name for row in train + held for name in row["answer"]["slots"]})
    joined = sum(len(row["answer"]["intents"]) > 1 for row in train + held)
    print(f"  snips: {len(slot_names)} slot types, {joined} of {len(train) + len(held)} messages carry two intents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clinc", type=Path, required=True,
                        help=f"git directory of github.com/clinc/oos-eval (holding commit {CLINC_COMMIT[:12]})")
    parser.add_argument("--snips", type=Path, required=True,
                        help=f"git directory of github.com/sonos/nlu-benchmark (holding commit {SNIPS_COMMIT[:12]})")
    args = parser.parse_args()
    clinc(args.clinc)
    snips(args.snips)


if __name__ == "__main__":
    main()
