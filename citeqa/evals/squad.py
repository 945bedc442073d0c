"""Evaluation questions: loading SQuAD v1/v2 and JSONL question files, and the fixed article split.

The project splits SQuAD by article, never by question (paragraphs of one article share
vocabulary and facts): reward-model training, threshold calibration and evaluation each get
their own articles. An unanswerable question has ``answers == ()``; for it, declining is right.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citeqa.errors import ConfigError, SourceError
from citeqa.text import normalize_answer

TRAIN_ARTICLES: tuple[str, ...] = (
    "Normans",
    "Computational_complexity_theory",
    "Huguenot",
    "Steam_engine",
    "1973_oil_crisis",
)
CALIBRATION_ARTICLES: tuple[str, ...] = ("European_Union_law", "Packet_switching")
EVAL_ARTICLES: tuple[str, ...] = (
    "Harvard_University",
    "Scottish_Parliament",
    "Imperialism",
    "French_and_Indian_War",
)
SPLITS: dict[str, tuple[str, ...]] = {
    "train": TRAIN_ARTICLES,
    "calibration": CALIBRATION_ARTICLES,
    "eval": EVAL_ARTICLES,
}


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answers (empty when the question is unanswerable)."""

    id: str
    question: str
    answers: tuple[str, ...]  # distinct gold answer texts in file order; () = declining is right
    article: str  # SQuAD article title; "" when the file does not say
    context: str  # the paragraph the question was written for; "" when the file does not say

    @property
    def answerable(self) -> bool:
        """``answerable(self.answers)``."""
        return answerable(self.answers)


def answerable(golds: Iterable[str]) -> bool:
    """Some gold answer holds a word after SQuAD's normalisation (a gold answer of "" or "the"
    alone cannot be matched: the report counts such a question unanswerable too)."""
    return any(normalize_answer(a) for a in golds)


def articles_for_split(split: str, *, also: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The articles of a named split ("train", "calibration" or "eval"); ConfigError naming the
    choices, with ``also`` (other names the caller takes itself) among them."""
    try:
        return SPLITS[split]
    except KeyError:
        raise ConfigError(
            f"unknown split {split!r}; choose one of {[*sorted(SPLITS), *also]}") from None


HELD_OUT_SPLITS = ("calibration", "eval")  # never trained on


def article_key(title: str) -> str:
    """A title as the split compares it: NFKC, case-folded, invisible characters dropped, runs
    of spaces and underscores as one underscore ("Harvard University", "harvard_university "
    and "Harvard_University" are one article; an exact comparison let any of them past)."""
    text = "".join(c for c in unicodedata.normalize("NFKC", title)
                   if unicodedata.category(c) != "Cf")
    return re.sub(r"[\s_]+", "_", text).strip("_").casefold()


_SPLIT_OF = {article_key(a): name for name, arts in SPLITS.items() for a in arts}


def split_of_article(article: str) -> str | None:
    """The split an article belongs to (its title compared by ``article_key``), or None for an
    article outside the fixed split."""
    return _SPLIT_OF.get(article_key(article))


def check_not_held_out(items: Iterable[QAItem], source: str) -> None:
    """ConfigError when training data from ``source`` holds questions of the calibration or
    evaluation articles: trained on, they would make the decline threshold and ``citeqa eval``
    report better than the truth."""
    check_training_articles((i.article for i in items), source)


def check_training_articles(articles: Iterable[str], source: str) -> None:
    """``check_not_held_out`` for the articles training data records it was made from."""
    held = sorted({a for a in articles if split_of_article(a) in HELD_OUT_SPLITS})
    if held:
        raise ConfigError(
            f"{source} holds questions of the calibration or evaluation articles "
            f"({', '.join(held)}); training on them would make the decline threshold and "
            "`citeqa eval` report better than the truth: leave those articles out (--split "
            "train where the command has one)")


def check_calibration_articles(articles: Iterable[str], source: str) -> None:
    """ConfigError when calibration data from ``source`` holds questions of the training or
    evaluation articles: the verifier was trained on the first (its scores there are surer than
    on unseen text, so the threshold certifies less than it says), and a threshold chosen on the
    second makes ``citeqa eval`` report better than the truth. Questions of other articles (your
    own documents) are not this project's split and pass."""
    wrong = sorted({a for a in articles if split_of_article(a) in ("train", "eval")})
    if wrong:
        raise ConfigError(
            f"{source} holds questions of the training or evaluation articles "
            f"({', '.join(wrong)}); a threshold calibrated on them certifies less than it "
            "says: make the calibration data with --split calibration")


def split_warning(items: Iterable[QAItem]) -> str | None:
    """What to say when an evaluation's questions include the training or calibration
    articles (None when they do not): figures over them are not held out."""
    seen = Counter(split_of_article(i.article) for i in items)
    parts = [f"{seen[s]} question{'' if seen[s] == 1 else 's'} of the {s} articles"
             for s in ("train", "calibration") if seen[s]]
    if not parts:
        return None
    return (f"these questions include {' and '.join(parts)}, which the models were trained "
            "or calibrated on: the figures over them are not held out; pass --split eval")


def held_out_articles(titles: Iterable[str]) -> frozenset[str]:
    """Every other distinct title in sorted order (the 2nd, 4th, ...): the extra training
    articles (more-train.json) whose generator candidates fit the reward model's combination
    and which every other training step leaves out. Depends only on the set of titles."""
    return frozenset(sorted(set(titles))[1::2])


def _dedupe(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


def _text(value: Any, what: str, *, absent_ok: bool = False) -> str:
    """``value`` when it is a string ("" for null/absent where ``absent_ok``); TypeError
    naming ``what`` else (a number or null there would surface later as a crash, or as the
    passage text "None")."""
    if absent_ok and value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{what} is {type(value).__name__}, not a string")
    return value


def _id(value: Any) -> str:
    """A question's id as text: a string's, or an integer's digits; TypeError for another
    value (null was the id "None")."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"an id is {type(value).__name__}, not a string or an integer")
    return str(value)


def _check_unique_ids(items: list[QAItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise SourceError(f"{path}: question id {item.id!r} occurs twice; ids must be unique "
                              "(compared as text: 1 and \"1\" are one id)")
        seen.add(item.id)


def _parse_squad(
    obj: dict[str, Any], path: Path, articles: Collection[str] | None
) -> list[QAItem]:
    data = obj.get("data")
    if not isinstance(data, list):
        raise SourceError(f"{path}: not a SQuAD file (no 'data' list at the top level)")
    wanted = None if articles is None else {article_key(a): a for a in articles}
    items: list[QAItem] = []
    seen_titles: set[str] = set()  # (by article_key)
    try:
        for article in data:
            title = _text(article.get("title"), "an article's 'title'", absent_ok=True)
            seen_titles.add(article_key(title))
            if wanted is not None and article_key(title) not in wanted:
                continue
            for paragraph in article["paragraphs"]:
                context = _text(paragraph.get("context"), "a context", absent_ok=True)
                for qa in paragraph["qas"]:
                    answers: tuple[str, ...] = ()
                    impossible = qa.get("is_impossible", False)
                    if not isinstance(impossible, bool):  # ("false" was true)
                        raise TypeError(f"is_impossible is {impossible!r}, not true or false")
                    if not impossible:
                        if "answers" not in qa:  # not silently unanswerable (as in JSONL)
                            raise KeyError("'answers' (a question the documents cannot answer "
                                           "has [] or is_impossible true)")
                        answers = _dedupe(_text(a["text"], "an answer's text")
                                          for a in qa["answers"])
                    items.append(
                        QAItem(
                            id=_id(qa["id"]),
                            question=_text(qa["question"], "a question"),
                            answers=answers,
                            article=title,
                            context=context,
                        )
                    )
    except (KeyError, TypeError, AttributeError) as exc:
        raise SourceError(
            f"{path}: malformed SQuAD file ({type(exc).__name__}: {exc}); expected "
            "data[].paragraphs[].qas[] with 'id', 'question' and 'answers'"
        ) from exc
    if wanted is not None and (missing := sorted(a for k, a in wanted.items()
                                                 if k not in seen_titles)):
        raise SourceError(f"{path} lacks articles of the split asked for: {missing}; --split "
                          "names the project's SQuAD 2.0 articles (../shared/data/squad2/"
                          "qa.json holds them all): with another file, take all its articles "
                          "(leave --split out; `citeqa train generator-data`: --split all)")
    return items


def _parse_jsonl(text: str, path: Path) -> list[QAItem]:
    items: list[QAItem] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "answers" not in row:  # not silently unanswerable: declining would score right
                raise KeyError("'answers' (a list; [] for a question the documents cannot "
                               "answer)")
            answers = row["answers"]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise TypeError("'answers' must be a list of strings")
            items.append(
                QAItem(
                    id=_id(row["id"]),
                    question=_text(row["question"], "'question'"),
                    answers=_dedupe(answers),
                    article=_text(row.get("article"), "'article'", absent_ok=True),
                    context=_text(row.get("context"), "'context'", absent_ok=True),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(
                f"{path}:{lineno}: bad question line ({type(exc).__name__}: {exc}); each line must "
                'be a JSON object like {"id": "q1", "question": "...", "answers": ["..."]}'
            ) from exc
    return items


def squad_objects(parent: object, key: str) -> list[dict[str, Any]]:
    """The objects of a SQuAD file's object's list ``key`` (``data``, ``paragraphs``, ``qas``,
    ``answers``...), [] where it has none: for readers of fields the question loader does not
    check (``answer_start``, ``plausible_answers``)."""
    items = parent.get(key) if isinstance(parent, dict) else None
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def read_question_file(path: Path) -> str:
    """The text of a question file (SQuAD JSON or JSONL), gzipped or not (told by its first
    bytes: the shared SQuAD 1.1 training file is .json.gz), less a UTF-8 byte order mark
    (Windows editors write one: it was "bad question line 1"); OSError, UnicodeDecodeError."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8-sig")


def _read(path: Path) -> str:
    try:
        return read_question_file(path)
    except FileNotFoundError:
        raise SourceError(
            f"question file not found: {path}; pass a SQuAD JSON or JSONL question file"
        ) from None
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as exc:
        raise SourceError(f"cannot read question file {path}: {exc}") from exc


def load_squad_questions(path: Path, articles: Collection[str] | None = None) -> list[QAItem]:
    """Questions of a SQuAD v1.1/v2.0 JSON file, optionally only those of ``articles``.

    Unanswerable (v2 ``is_impossible``) questions get ``answers == ()``; repeated gold answer
    texts are kept once, in file order. Raises SourceError on a bad file or unknown article.
    """
    path = Path(path)
    try:
        obj = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc}); expected a SQuAD file") from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a SQuAD file (top level is not an object)")
    items = _parse_squad(obj, path, articles)
    _check_unique_ids(items, path)
    return items


def load_questions(path: Path, articles: Collection[str] | None = None) -> list[QAItem]:
    """Load a SQuAD JSON or a JSONL question file, telling them apart by content.

    ``articles`` filters SQuAD files by article title and JSONL files by their ``article`` key,
    each compared by ``article_key`` ("Harvard University" is Harvard_University).
    """
    path = Path(path)
    text = _read(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None  # several lines of JSON: JSONL
    if isinstance(obj, dict) and "data" in obj:
        items = _parse_squad(obj, path, articles)
    elif obj is None or isinstance(obj, dict):
        items = _parse_jsonl(text, path)
        if articles is not None:  # (titles compared as the split compares them)
            keys = {article_key(a) for a in articles}
            items = [item for item in items if article_key(item.article) in keys]
    else:
        raise SourceError(
            f"{path}: neither a SQuAD file nor JSONL questions; see citeqa/evals/squad.py"
        )
    if not items:
        raise SourceError(f"{path}: no questions found (check the file and the article filter)")
    _check_unique_ids(items, path)
    return items
