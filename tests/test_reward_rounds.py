"""evals/reward_rounds.py: the recorded rounds rebuild their question files and mixes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.reward_rounds import build_mix, groups, kind_of, load_spec, round_spec, subset

SQUAD = {"version": "v2.0", "data": [
    {"title": "A", "paragraphs": [
        {"context": "one", "qas": [{"id": "q1", "question": "?"}, {"id": "q2", "question": "?"}]},
        {"context": "two", "qas": [{"id": "q3", "question": "?"}]}]},
    {"title": "B", "paragraphs": [{"context": "three", "qas": [{"id": "q4", "question": "?"}]}]},
]}


def test_subset_keeps_only_the_questions_asked_for() -> None:
    out = subset(SQUAD, ["q2", "q4"])
    assert [(a["title"], [[q["id"] for q in p["qas"]] for p in a["paragraphs"]])
            for a in out["data"]] == [("A", [["q2"]]), ("B", [["q4"]])]
    assert out["version"] == "v2.0" and len(SQUAD["data"][0]["paragraphs"]) == 2  # untouched
    with pytest.raises(SystemExit, match="1 of 2 questions are not in the data"):
        subset(SQUAD, ["q1", "nope"])


def rows(*rs: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rs)


def test_a_mix_is_its_groups_in_the_recorded_order(tmp_path: Path) -> None:
    """A synthetic group may share its key with a generator question: the kind tells them apart."""
    gen = tmp_path / "gen.jsonl"
    gen.write_text(rows({"group": "k1", "source": "generator", "label": 1},
                        {"group": "k1", "source": "generator", "label": 0},
                        {"kind": "question", "qid": "k1"},
                        {"group": "k2", "source": "generator", "label": 0},
                        {"kind": "question", "qid": "k2"}))
    syn = tmp_path / "syn.jsonl"
    syn.write_text(rows({"group": "k1", "source": "synthetic:gold", "label": 1},
                        {"group": "k3", "source": "synthetic:retrieved", "label": 0}))
    rt = tmp_path / "rt.jsonl"
    rt.write_text(rows({"group": "rt:k1:negation", "source": "redteam:negation", "label": 0}))
    found = groups([gen, syn, rt])
    assert set(found) == {"gen:k1", "gen:k2", "syn:k1", "syn:k3", "rt:rt:k1:negation"}
    assert [kind_of(json.loads(x)) for x in found["gen:k1"]] == ["gen"] * 3
    lines = build_mix(["syn:k1", "gen:k2", "rt:rt:k1:negation", "gen:k1"], found)
    assert [json.loads(x).get("source") for x in lines] == [
        "synthetic:gold", "generator", None, "redteam:negation", "generator", "generator", None]
    with pytest.raises(SystemExit, match="1 groups of the mix are missing"):
        build_mix(["gen:k9"], found)


def test_the_recorded_rounds_are_whole() -> None:
    spec = load_spec()
    assert [r["name"] for r in spec["rounds"]] == ["D", "L", "M"]
    for r in spec["rounds"]:
        kinds = [item.split(":", 1)[0] for item in r["mix"]]
        assert set(kinds) <= {"gen", "syn", "rt"} and len(set(r["mix"])) == len(r["mix"])
        gen = {item.split(":", 1)[1] for item in r["mix"] if item.startswith("gen:")}
        asked = [q for ids in r["questions"].values() for q in ids]
        assert gen == set(asked) and len(asked) == len(set(asked)), r["name"]
    assert round_spec(spec, "D")["adapter_revision"] == "4792b0e"  # the 200-step adapter
    combine = spec["combine_questions"]
    assert len(combine) == len(set(combine)) == 880
    test = spec["test_questions"]
    assert len(test) == len(set(test)) == 800
    trained = {q for r in spec["rounds"] for ids in r["questions"].values() for q in ids}
    # the combination is fitted, and the rounds judged, on questions never trained on
    assert not trained & set(combine) and not trained & set(test) and not set(combine) & set(test)
