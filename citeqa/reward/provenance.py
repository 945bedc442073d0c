"""Whether a reward model's calibration was made on the answers a service gives.

Learn-then-Test certifies an answered accuracy for the answers whose scores it saw
(calibrate.py): those of one generator (its model, prompt and settings), each the best of as
many candidates per question as the calibration data held. Served with another generator, or
picking the best of more candidates (the highest of several scores is higher, for right and
wrong answers alike), the certified accuracy does not carry over. ``citeqa calibrate`` records
both in calibration.json (``generators``, ``candidates_per_question``); ``calibration_mismatch``
names what a service does differently, so that it can say so when it starts.

Pure data: this module imports no generation or prompt code (the caller brings the serving
generator's fingerprint, ``generation.prompt.generator_fingerprint``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from citeqa.compute import MODEL_ID_SUFFIX

# The fingerprint's fields that change which answers come (temperature: only when sampling).
COMPARED = ("model_id", "prompt_sha256", "answer_mode", "top_k_passages", "passage_chars")


_DIGEST = re.compile(r"@[0-9a-f]{8}(?=\+|$)")  # a local model folder's weights digest


def weights_id(model_id: str) -> str:
    """``model_id`` without its CPU serving format's suffix (the same weights, rounded
    otherwise: not another generator)."""
    for suffix in MODEL_ID_SUFFIX.values():
        model_id = model_id.removesuffix(suffix)
    return model_id


def digests_aside(was: str, now: str) -> tuple[str, str]:
    """Two generator ids as compared: without the weights digest where one of them has none
    (recorded before a local folder's id had one: calibrations, reward data, eval runs)."""
    if bool(_DIGEST.search(was)) != bool(_DIGEST.search(now)):
        return _DIGEST.sub("", was), _DIGEST.sub("", now)
    return was, now


def same_model(was: str, now: str) -> tuple[str, str]:
    """The two ids as a calibration, or reward data being resumed, compares them: the same
    weights in another number format are the same generator (``weights_id``), and
    ``digests_aside``."""
    return digests_aside(weights_id(was), weights_id(now))


def candidates_per_question(markers: Iterable[Mapping[str, Any]]) -> int | None:
    """How many candidates per question reward data asked for (its question markers' ``n``);
    None when the markers do not say, or say different things."""
    counts = {m.get("n") for m in markers}
    if len(counts) != 1:
        return None
    n = counts.pop()
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def _differences(recorded: Mapping[str, Any], serving: Mapping[str, Any], *,
                 sampling: bool) -> list[str]:
    out = []
    for key in (*COMPARED, *(("temperature",) if sampling else ())):
        was, now = recorded.get(key), serving.get(key)
        if key == "model_id" and isinstance(was, str) and isinstance(now, str):
            was, now = same_model(was, now)
        if was is not None and was != now:
            out.append(f"{key} {was!r} -> {now!r}")
    return out


def calibration_mismatch(body: Mapping[str, Any], serving: Mapping[str, Any],
                         candidates: int) -> list[str]:
    """What differs between the answers a calibration (``body``, calibration.json) was made on
    and those of a service (``serving``: its generator's fingerprint; ``candidates`` per
    question), one phrase each ("top_k_passages 3 -> 5"); empty when nothing recorded differs.
    A calibration of several generators' data fits one that matches any of them."""
    recorded = [g for g in body.get("generators") or () if isinstance(g, Mapping)]
    out = min((_differences(g, serving, sampling=candidates > 1) for g in recorded),
              key=len, default=[])
    n = body.get("candidates_per_question")
    if n is not None and n != candidates:
        out.append(f"candidates per question {n} -> {candidates}")
    elif n is None and candidates > 1:
        out.append(f"candidates per question not recorded (calibrations before this release) "
                   f"-> {candidates}")
    return out


def mismatch_warning(body: Mapping[str, Any], serving: Mapping[str, Any],
                     candidates: int) -> str | None:
    """The line a service logs when it starts with a calibration made on other answers than
    its own (``calibration_mismatch``); None when none differs."""
    differ = calibration_mismatch(body, serving, candidates)
    if not differ:
        return None
    target = body.get("target_accuracy")
    certified = (f" ({target:.0%} answered accuracy)"  # a null threshold certified none
                 if isinstance(target, float) and body.get("threshold") is not None else "")
    return ("the reward model's decline threshold was calibrated on other answers than this "
            f"service gives ({'; '.join(differ)}): what it certifies{certified} does not carry "
            "over; calibrate it on this generator's answers (docs/calibrate.md)")
