"""Building verifier training data: the generator's own candidates, cheap synthetic pairs, and
red-team unanswerables. A label is what the verifier predicts, an answer right *and supported*
(``label``): right by the evaluation's correctness rule (``citeqa.evals.metrics.is_correct``:
token F1 >= 0.5 with a gold answer and a verified quote; any answer to an unanswerable question
is wrong) and standing in its own quote (``citeqa.generation.cited.answer_span``, the
evaluation's ``supported``). A right answer beside a quote that does not hold it is a negative.

- ``generator_examples``: ask the pipeline (the served generator, its candidates covering the
  retrieved passages) and label every candidate: the mistakes the verifier will really meet.
  Resumable: a question marker closes each question's lines.
- ``synthetic_examples``: from a question, its paragraph and its gold answer: the gold answer
  with the sentence that holds it (right), and as negatives another span of that same quote,
  a span of another sentence of the paragraph, a span of a retrieved passage that is not the
  gold one, the answer widened or cut, and the answer with a quote that does not hold it
  (unsupported: wrong); for an unanswerable question, its plausible answer (or the
  best-matching span) with its sentence.
- ``redteam_examples``: a made unanswerable question (``citeqa.redteam``) with the original
  question's gold answer and quote: looks answerable, is not.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from citeqa.atomic import write_text_atomic
from citeqa.errors import ConfigError, InvalidRequestError, OutputFormatError
from citeqa.evals.metrics import is_correct
from citeqa.evals.squad import QAItem, read_question_file, squad_objects
from citeqa.generation.cited import answer_span
from citeqa.generation.prompt import generator_fingerprint
from citeqa.pipeline import Pipeline
from citeqa.redteam.corpus import NUMBER, names_in
from citeqa.redteam.maker import Variant
from citeqa.reward.data import Example, write_examples
from citeqa.reward.provenance import same_model
from citeqa.reward.scorer import judged
from citeqa.reward.verifier import Judged, around
from citeqa.text import relevance, sentence_spans
from citeqa.training.demos import quote_span
from citeqa.types import Answer, AskArgs, Candidate, Hit

MIN_QUOTE, MAX_QUOTE = 20, 200  # the generator's quote bounds (GenerationConfig)


def label(answer: str, quote: str | None, golds: Sequence[str]) -> int:
    """1 when ``answer`` is right by the correctness rule and stands in its verified ``quote``
    (None: no verified quote); 0 otherwise, and always without ``golds`` (unanswerable)."""
    if quote is None or not golds or answer_span(answer, quote) is None:
        return 0
    return int(is_correct(answer, golds, quote_valid=True))


# --- generator candidates --------------------------------------------------------------------


def _generator_as_now(was: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``was`` (a question marker's) with its generator's model id compared as ``now``'s is
    (``same_model``): data made before local folders' ids had a weights digest, or in another
    CPU number format (``auto`` picks it by a timed probe, which a busy machine sways), resumes
    with the same weights."""
    old, new = (was.get("generator") or {}), (now.get("generator") or {})
    if isinstance(old, dict) and isinstance(new, dict) and isinstance(
            old.get("model_id"), str) and isinstance(new.get("model_id"), str):
        a, b = same_model(old["model_id"], new["model_id"])
        if a == b:  # the same weights: the same generator
            return {**was, "generator": {**old, "model_id": new["model_id"]}}
    return was


def _done_qids(out: Path, made_by: dict[str, Any] | None = None) -> set[str]:
    """Question ids complete in ``out``; lines of incomplete questions are dropped. ConfigError
    when a complete question was made by another generator or settings than ``made_by`` (a
    question marker's ``generator`` and ``n``): resuming would mix two kinds of candidates."""
    if out.exists() and not out.is_file():
        raise ConfigError(f"--out {out} is not a file; name a JSONL file to write")
    if not out.is_file():
        return set()
    rows: list[dict[str, Any]] = []
    lines = out.read_bytes().split(b"\n")  # each line decoded alone: a cut may split a character
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            # the last line, cut short by an interrupted run: after lines of this command's,
            # or alone where it begins as every line of ours does
            if n == len(lines) and (rows or line.startswith(b'{"')):
                continue
            row = None
        if not _is_reward_row(row):  # resuming rewrites the file: never over someone else's
            raise ConfigError(
                f"--out {out} holds something other than this command's reward data (line {n}); "
                "choose another --out (it would be rewritten)")
        rows.append(row)
    markers = [r for r in rows if r.get("kind") == "question"]
    if made_by is not None:
        for marker in markers:
            was = {k: marker.get(k) for k in made_by if k in marker}  # older files lack "n"
            was = _generator_as_now(was, made_by)
            if was != {k: made_by[k] for k in was}:
                diff = "; ".join(f"{k}: was {was[k]!r}, now {made_by[k]!r}" for k in was
                                 if was[k] != made_by[k])
                raise ConfigError(f"{out} holds candidates of another generator or settings "
                                  f"({diff}); choose another --out, or delete it to start over")
    done = {str(r["qid"]) for r in markers}
    kept = [json.dumps(r, ensure_ascii=False) for r in rows
            if str(r.get("qid") or r.get("group")) in done]
    write_text_atomic(out, "".join(k + "\n" for k in kept))  # a crash here loses nothing
    return done


def _is_reward_row(row: Any) -> bool:
    """A line this builder writes: a generator candidate (``Example.to_json``, source
    "generator") or a question marker; not another builder's examples (synthetic, red team)."""
    return isinstance(row, dict) and (
        (row.get("kind") == "question" and "qid" in row)
        or ({"group", "question", "answer", "label"} <= row.keys()
            and row.get("source") == "generator"))


@dataclass(frozen=True)
class BuildStats:
    questions: int  # asked now
    skipped: int  # already complete in the file
    examples: int
    right: int
    seconds: float


def generator_examples(pipeline: Pipeline, items: Iterable[QAItem], out: Path, *, n: int = 3,
                       batch: int = 4, progress: bool = True) -> BuildStats:
    """Ask ``pipeline`` the ``items`` (``n`` candidates each, ``batch`` questions at a time)
    and append every candidate, labelled, then a question marker, to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = generator_fingerprint(pipeline.generator.backend.model_id,
                                        pipeline.cfg.generation)
    done = _done_qids(out, {"generator": fingerprint, "n": n})
    items = list(items)
    todo = [it for it in items if it.id not in done]
    documents = pipeline.retriever.document
    n_examples = n_right = 0
    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="generator data",
                                                   unit="question",
                                                   disable=not progress) as bar:
        for at in range(0, len(todo), batch):
            chunk = todo[at : at + batch]
            asks = [AskArgs(it.question, n_candidates=n) for it in chunk]
            answers: list[Answer | None]
            try:
                answers = list(pipeline.ask_many(asks))
            except (InvalidRequestError, OutputFormatError):
                # one question the pipeline refuses (an over-long one, a grammar that would not
                # compile) failed the whole batch: ask each alone, so only it has no candidates
                answers = [_ask_alone(pipeline, a) for a in asks]
            for item, answer in zip(chunk, answers, strict=True):
                examples = []
                for c in answer.candidates if answer is not None else []:
                    right = label(c.answer, c.quote.text if c.quote else None, item.answers)
                    examples.append(Example(judged(item.question, c, documents), right,
                                            item.answers, item.id, "generator",
                                            candidate_signals(c), item.article))
                n_examples += write_examples(f, examples)
                n_right += sum(e.label for e in examples)
                f.write(json.dumps({"kind": "question", "qid": item.id,
                                    "answerable": item.answerable, "article": item.article,
                                    "generator": fingerprint, "n": n},
                                   ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    return BuildStats(len(todo), len(items) - len(todo), n_examples, n_right,
                      time.perf_counter() - t0)


def _ask_alone(pipeline: Pipeline, args: AskArgs) -> Answer | None:
    """The answer to one question, None when the pipeline refuses it."""
    try:
        [answer] = pipeline.ask_many([args])
    except (InvalidRequestError, OutputFormatError):
        return None
    return answer


def candidate_signals(c: Candidate) -> dict[str, float]:
    """What the generator and the pipeline said of a candidate, kept beside it so that a
    reward model can be compared with (or combined with) them on the same candidates."""
    return {"logprob": float(c.logprob), "mean_logprob": float(c.mean_logprob),
            "n_tokens": float(c.n_tokens), "retrieval_score": float(c.retrieval_score),
            "retrieval_fused": float(c.retrieval_fused),
            "rm_score": float(c.score if c.score is not None else 0.0)}


# --- synthetic pairs -------------------------------------------------------------------------


def _quote_at(text: str, start: int, end: int) -> tuple[int, int] | None:
    return quote_span(text, start, end, min_chars=MIN_QUOTE, max_chars=MAX_QUOTE)


def _example(question: str, text: str, title: str, quote: tuple[int, int], answer: str,
             golds: Sequence[str], group: str, source: str) -> Example:
    before, after = around(text, *quote)
    return Example(Judged(question, answer, text[quote[0]:quote[1]], title, before, after),
                   label(answer, text[quote[0]:quote[1]], golds), tuple(golds), group, source)


def _spans_in(text: str, rng: random.Random, avoid: tuple[int, int] | None = None,
              ) -> list[tuple[int, int]]:
    """Answer-like spans of ``text``: names and numbers, else runs of 1-4 words; not
    overlapping ``avoid``."""
    spans = [(s, e) for s, e, _ in names_in(text)]
    spans += [(m.start(), m.end()) for m in NUMBER.finditer(text)]
    if not spans:
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        if words:
            i = rng.randrange(len(words))
            j = min(len(words) - 1, i + rng.randint(0, 3))
            spans = [(words[i][0], words[j][1])]
    if avoid is not None:
        spans = [(s, e) for s, e in spans if e <= avoid[0] or s >= avoid[1]]
    return [(s, e) for s, e in spans if text[s:e].strip(" .,;:")]


def _widen(text: str, start: int, end: int, rng: random.Random, qs: int, qe: int,
           ) -> tuple[int, int] | None:
    """The answer widened by 2-5 words (within the quote), or cut to its first word."""
    if rng.random() < 0.5 and " " in text[start:end]:
        return start, start + text[start:end].index(" ")
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[qs:qe])]
    words = [(qs + s, qs + e) for s, e in words]
    after = [w for w in words if w[0] >= end][: rng.randint(2, 5)]
    return (start, after[-1][1]) if after else None


def synthetic_examples(item: QAItem, answer_start: int | None, title: str,
                       retrieved: Sequence[Hit], rng: random.Random,
                       plausible: Sequence[str] = ()) -> list[Example]:
    """The synthetic examples of one question (see the module docstring); [] when its
    paragraph or answer cannot make any."""
    text, group = item.context, item.id
    out: list[Example] = []
    if not item.answerable:  # a plausible answer (or the best-matching span), with its sentence
        found = [(text.find(p), p) for p in plausible if p and text.find(p) >= 0]
        if found:
            s, p = found[0]
            span = (s, s + len(p))
        else:
            sentences = sentence_spans(text)
            if not sentences:
                return []
            scores = relevance([text[a:b] for a, b in sentences], item.question)
            a, b = sentences[max(range(len(sentences)), key=scores.__getitem__)]
            options = _spans_in(text[a:b], rng)
            if not options:
                return []
            s, e = rng.choice(options)
            span = (a + s, a + e)
        quote = _quote_at(text, *span)
        if quote is None:
            return []
        return [_example(item.question, text, title, quote, text[span[0]:span[1]], (), group,
                         "synthetic:unanswerable")]
    answer = item.answers[0]
    a0 = answer_start if answer_start is not None and text[answer_start:].startswith(answer) \
        else text.find(answer)
    if a0 < 0:
        return []
    a1 = a0 + len(answer)
    quote = _quote_at(text, a0, a1)
    if quote is None:
        return []
    golds = item.answers
    out.append(_example(item.question, text, title, quote, answer, golds, group,
                        "synthetic:gold"))
    # another span of the very quote that holds the answer (the hardest negative)
    inside = _spans_in(text[quote[0]:quote[1]], rng, (a0 - quote[0], a1 - quote[0]))
    if inside:
        s, e = rng.choice(inside)
        out.append(_example(item.question, text, title, quote,
                            text[quote[0] + s:quote[0] + e], golds, group, "synthetic:same_quote"))
    # a span of another sentence of the paragraph
    others = [(s, e) for s, e in sentence_spans(text) if e <= quote[0] or s >= quote[1]]
    if others:
        s, e = rng.choice(others)
        options = _spans_in(text[s:e], rng)
        q = _quote_at(text, s, e) if options else None
        if q is not None:
            x, y = rng.choice(options)
            out.append(_example(item.question, text, title, q, text[s + x:s + y], golds, group,
                                "synthetic:other_sentence"))
        # the gold answer with a quote that does not hold it (free mode's failure)
        if q is not None and rng.random() < 0.3:
            out.append(_example(item.question, text, title, q, answer, golds, group,
                                "synthetic:unsupported"))
    # a span of a retrieved passage that is not the gold paragraph
    wrong = [h for h in retrieved if h.passage.text.strip() not in text and answer not in
             h.passage.text]
    if wrong:
        hit = wrong[0]
        ptext = hit.passage.text
        sentences = sentence_spans(ptext)
        if sentences:
            scores = relevance([ptext[a:b] for a, b in sentences], item.question)
            a, b = sentences[max(range(len(sentences)), key=scores.__getitem__)]
            options = _spans_in(ptext[a:b], rng)
            q = _quote_at(ptext, a, b) if options else None
            if q is not None:
                x, y = rng.choice(options)
                out.append(_example(item.question, ptext, hit.title, q, ptext[a + x:a + y],
                                    golds, group, "synthetic:retrieved"))
    # the answer widened or cut (labelled by the rule: a small change may still be right)
    widened = _widen(text, a0, a1, rng, *quote)
    if widened is not None and widened != (a0, a1):
        out.append(_example(item.question, text, title, quote, text[widened[0]:widened[1]],
                            golds, group, "synthetic:widened_or_cut"))
    return out


# --- red-team unanswerables --------------------------------------------------------------------


def redteam_examples(variants: Iterable[Variant],
                     titles: Callable[[str], str | None] | None = None,
                     ) -> Iterator[Example]:
    """A made unanswerable question with the original answer and its quote: wrong."""
    for v in variants:
        if v.answerable or not v.answer:
            continue
        a0 = v.passage.find(v.answer)
        quote = _quote_at(v.passage, a0, a0 + len(v.answer)) if a0 >= 0 else None
        if quote is None:
            continue
        before, after = around(v.passage, *quote)
        title = (titles(v.passage) or "") if titles else ""
        yield Example(Judged(v.question, v.answer, v.passage[quote[0]:quote[1]], title,
                             before, after), 0, (), f"rt:{v.seed_id}:{v.kind}",
                      f"redteam:{v.kind}", article=v.article)


def plausible_answers(path: Path) -> dict[str, list[str]]:
    """question id -> plausible answers of the unanswerable questions of a SQuAD 2.0 file,
    told by its content whatever its name (gzipped too); {} for a JSON-lines file."""
    try:
        obj = json.loads(read_question_file(path))
    except ValueError:  # JSON lines: no plausible answers
        return {}
    if not isinstance(obj, dict):
        return {}
    out = {str(q.get("id")): [a["text"] for a in squad_objects(q, "plausible_answers")
                               if isinstance(a.get("text"), str)]
           for article in squad_objects(obj, "data") for p in squad_objects(article, "paragraphs")
           for q in squad_objects(p, "qas")}
    return {qid: answers for qid, answers in out.items() if answers}


def stats_of(examples: Sequence[Example]) -> dict[str, Any]:
    """Counts per source and label, for the data's record."""
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        c = out.setdefault(ex.source, {"examples": 0, "right": 0})
        c["examples"] += 1
        c["right"] += ex.label
    return out
