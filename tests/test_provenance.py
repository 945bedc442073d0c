"""reward/provenance.py: a calibration names the answers it certified, and a service that
gives other answers is told what differs."""

from __future__ import annotations

import pytest

from citeqa.config import GenerationConfig
from citeqa.generation.prompt import generator_fingerprint
from citeqa.reward.provenance import (
    calibration_mismatch,
    candidates_per_question,
    mismatch_warning,
    weights_id,
)

GEN = {"model_id": "smollm2+lora-ab12", "prompt_sha256": "cc72", "answer_mode": "span",
       "temperature": 0.7, "top_k_passages": 3, "passage_chars": 600}
BODY = {"generators": [GEN], "candidates_per_question": 1, "target_accuracy": 0.8,
        "threshold": 1.25}


def test_the_same_weights_in_another_number_format_are_the_same_generator() -> None:
    assert weights_id("smollm2+lora-ab12+bf16-int8w") == "smollm2+lora-ab12"
    assert weights_id("smollm2+lora-ab12+fp16-linear") == "smollm2+lora-ab12"
    assert weights_id("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    for served in ("smollm2+lora-ab12+bf16-int8w", "smollm2+lora-ab12"):
        assert calibration_mismatch({**BODY, "generators": [
            {**GEN, "model_id": "smollm2+lora-ab12+fp16-linear"}]},
            {**GEN, "model_id": served}, 1) == []


def test_a_local_folders_weights_digest_tells_its_models_apart() -> None:
    recorded = {**BODY, "generators": [{**GEN, "model_id": "generator@0a1b2c3d+lora-ab12"}]}
    assert calibration_mismatch(recorded, {**GEN, "model_id": "generator@0a1b2c3d+lora-ab12"},
                                1) == []
    assert calibration_mismatch(recorded, {**GEN, "model_id": "generator@99999999+lora-ab12"},
                                1) == ["model_id 'generator@0a1b2c3d+lora-ab12' -> "
                                       "'generator@99999999+lora-ab12'"]
    # a calibration recorded before ids had a digest: compared by the folder's name
    old = {**BODY, "generators": [{**GEN, "model_id": "generator+lora-ab12"}]}
    assert calibration_mismatch(old, {**GEN, "model_id": "generator@99999999+lora-ab12"},
                                1) == []


@pytest.mark.parametrize(("field", "value", "phrase"), [
    ("model_id", "smollm2", "model_id 'smollm2+lora-ab12' -> 'smollm2'"),
    ("prompt_sha256", "9f00", "prompt_sha256 'cc72' -> '9f00'"),
    ("answer_mode", "free", "answer_mode 'span' -> 'free'"),
    ("top_k_passages", 5, "top_k_passages 3 -> 5"),
    ("passage_chars", 800, "passage_chars 600 -> 800"),
])
def test_each_field_that_changes_the_answers_is_named(field, value, phrase) -> None:
    assert calibration_mismatch(BODY, {**GEN, field: value}, 1) == [phrase]


def test_temperature_counts_only_when_the_service_samples_several_candidates() -> None:
    serving = {**GEN, "temperature": 1.0}
    assert calibration_mismatch(BODY, serving, 1) == []  # one candidate: greedy
    assert calibration_mismatch({**BODY, "candidates_per_question": 4}, serving, 4) == [
        "temperature 0.7 -> 1.0"]


def test_more_candidates_than_calibrated_is_a_mismatch() -> None:
    assert calibration_mismatch(BODY, GEN, 4) == ["candidates per question 1 -> 4"]
    assert calibration_mismatch({**BODY, "candidates_per_question": 4}, GEN, 1) == [
        "candidates per question 4 -> 1"]
    old = {"generators": [GEN]}  # written before the count was recorded
    assert calibration_mismatch(old, GEN, 1) == []
    assert calibration_mismatch(old, GEN, 2) == [
        "candidates per question not recorded (calibrations before this release) -> 2"]


def test_data_of_several_generators_fits_any_of_them() -> None:
    other = {**GEN, "model_id": "qwen", "top_k_passages": 5}
    body = {**BODY, "generators": [other, GEN]}
    assert calibration_mismatch(body, GEN, 1) == []
    assert calibration_mismatch(body, {**GEN, "passage_chars": 900}, 1) == [
        "passage_chars 600 -> 900"]  # the nearest one's differences
    assert calibration_mismatch({"candidates_per_question": 1}, GEN, 1) == []  # none recorded


def test_the_warning_says_what_does_not_carry_over() -> None:
    assert mismatch_warning(BODY, GEN, 1) is None
    line = mismatch_warning(BODY, {**GEN, "answer_mode": "free"}, 4)
    assert line is not None
    assert "(answer_mode 'span' -> 'free'; candidates per question 1 -> 4)" in line
    assert "80% answered accuracy" in line and "docs/calibrate.md" in line
    # a calibration that found no threshold certified no accuracy: none is named
    uncertified = mismatch_warning({**BODY, "threshold": None}, {**GEN, "answer_mode": "free"}, 1)
    assert uncertified is not None and "answered accuracy" not in uncertified


def test_candidates_per_question_reads_the_markers() -> None:
    assert candidates_per_question([{"n": 4}, {"n": 4}]) == 4
    assert candidates_per_question([{"n": 4}, {"n": 1}]) is None  # mixed: cannot say
    assert candidates_per_question([{}, {}]) is None
    assert candidates_per_question([]) is None
    assert candidates_per_question([{"n": True}]) is None and candidates_per_question(
        [{"n": 0}]) is None


def test_the_fingerprint_follows_the_settings_that_shape_answers() -> None:
    base = generator_fingerprint("m", GenerationConfig())
    assert base["model_id"] == "m" and len(base["prompt_sha256"]) == 16
    assert generator_fingerprint("m", GenerationConfig(top_k_passages=7))["top_k_passages"] == 7
    assert calibration_mismatch({"generators": [base]},
                                generator_fingerprint("m", GenerationConfig()), 1) == []


def test_the_shipped_calibration_was_made_on_the_default_services_answers() -> None:
    """The packaged calibration.json records the answers it certified (the model card: the
    generator's greedy answer, one per question), and they are those the default settings give:
    a default service starts without a warning, and a request for more candidates is told."""
    import json

    from citeqa.config import preset
    from citeqa.reward.scorer import CALIBRATION, DEFAULT_DIR

    body = json.loads((DEFAULT_DIR / CALIBRATION).read_text())
    gen = preset("default").generation
    [recorded] = body["generators"]
    serving = generator_fingerprint(recorded["model_id"], gen)
    assert body["candidates_per_question"] == 1 == gen.n_candidates
    assert calibration_mismatch(body, serving, gen.n_candidates) == []
    assert mismatch_warning(body, serving, gen.n_candidates) is None
    assert calibration_mismatch(body, serving, 4) == ["candidates per question 1 -> 4"]
