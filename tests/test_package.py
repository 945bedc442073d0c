"""citeqa used as a Python library, as a developer embedding it would: what the packages export
(for type checkers too), and the mistakes a caller can make that REST's schema would catch."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from citeqa.config import Settings, preset
from citeqa.errors import InvalidRequestError
from citeqa.pipeline import Pipeline
from citeqa.retrieval import build_index, build_index_from_documents
from citeqa.types import AskArgs, Document

ROOT = Path(__file__).resolve().parents[1]
DOC = Document("moon", "Moon", "moon.txt", "The Moon orbits the Earth once every 27 days.")


@pytest.mark.parametrize("module", ["citeqa", "citeqa.reward", "citeqa.training"])
def test_exports_are_a_literal_list_type_checkers_read(module: str) -> None:
    """`__all__ = sorted(...)` is no export list to mypy or Pyright: under --strict every
    `from citeqa import Pipeline` was "not explicitly exported"."""
    path = ROOT / (module.replace(".", "/") + "/__init__.py")
    [assign] = [node for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__"]
    assert isinstance(assign.value, ast.List), f"{path}: __all__ must be a literal list"
    names = [ast.literal_eval(e) for e in assign.value.elts]
    mod = importlib.import_module(module)
    lazy = set(getattr(mod, "_HOMES", None) or getattr(mod, "_EXPORTS", {}))
    assert lazy <= set(names) and len(names) == len(set(names))
    for name in names:
        assert getattr(mod, name) is not None, name


def test_what_a_type_checker_without_pydantic_s_plugin_reads() -> None:
    """A library user's mypy (no pydantic plugin) found 16 "Missing named argument" errors in
    `Settings(preset="tiny")`: a default passed positionally to `Field` is no default to it;
    and the package's module `__getattr__`, seen by it, made `citeqa.Pipelin` an Any."""
    config = ast.parse((ROOT / "citeqa/config.py").read_text())
    positional = [ast.unparse(node) for node in ast.walk(config) if isinstance(node, ast.Call)
                  and ast.unparse(node.func) == "Field" and node.args]
    assert not positional, positional
    init = ast.parse((ROOT / "citeqa/__init__.py").read_text())
    [guard] = [node for node in init.body if isinstance(node, ast.If)
               and any(isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__getattr__"
                       for n in node.body)]
    assert ast.unparse(guard.test) == "not TYPE_CHECKING"
    assert not [n for n in init.body if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == "__getattr__"]


def test_one_source_given_alone_is_one_source(tmp_path: Path) -> None:
    """A str is a sequence of str: build_index("/path/f.txt", ...) took each character as a
    source, "/" first, and indexed the whole file system."""
    (tmp_path / "f.txt").write_text("The Moon orbits the Earth.")
    for source in (str(tmp_path / "f.txt"), tmp_path / "f.txt"):
        summary = build_index(source, tmp_path / "idx", preset("tiny").retrieval,  # type: ignore[arg-type]
                              progress=False)
        assert summary.documents == 1 and not summary.skipped
    # "" names nothing (taken as one source, Path("") walked the current folder)
    from citeqa.errors import EmptyCorpusError

    with pytest.raises(EmptyCorpusError, match="none of the 0 sources"):
        build_index("", tmp_path / "idx2", preset("tiny").retrieval, progress=False)  # type: ignore[arg-type]


def test_documents_an_index_cannot_hold_are_refused_naming_them(tmp_path: Path) -> None:
    """A lone surrogate raised a bare UnicodeEncodeError from deep in the writer; ids REST
    could never address ("../x", "a b", "") were kept."""
    cfg = preset("tiny").retrieval
    bad = [(Document("sg", "T", "s", "text \ud800 here"), "its text is not valid Unicode"),
           (Document("../x", "T", "s", "text"), "document id '../x' must be 1-200 characters"),
           (Document("a b", "T", "s", "text"), "must be 1-200"),
           (Document("", "T", "s", "text"), "must be 1-200"),
           (Document("moon2\n", "T", "s", "text"), "must be 1-200"),  # ($ matched before it)
           (Document(7, "T", "s", "text"), "its doc_id is a int"),  # type: ignore[arg-type]
           ("not a document", "not a citeqa.types.Document")]
    for doc, needle in bad:
        with pytest.raises(InvalidRequestError, match=needle):
            build_index_from_documents([DOC, doc], tmp_path / "idx", cfg,  # type: ignore[list-item]
                                       progress=False)
        assert not (tmp_path / "idx").exists()
    build_index_from_documents([DOC], tmp_path / "idx", cfg, progress=False)
    p = Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "idx",
                                        cache_dir=tmp_path / "cache"))
    before = p.index_version
    for doc, needle in bad:
        with pytest.raises(InvalidRequestError, match=needle):
            p.add_documents([doc])  # type: ignore[list-item]
    assert p.index_version == before and [d.doc_id for d in p.list_documents()[0]] == ["moon"]
    # NUL is stored as JSON holds it (files with one were indexed before, and still are)
    assert p.add_documents([Document("nul", "T", "s", "a\x00b text")]) == {"nul": 1}


def test_arguments_of_the_wrong_type_are_refused_saying_so(tmp_path: Path) -> None:
    """ask(42) said the question was empty; top_k=2.5 passed the range check and failed deep
    inside with a TypeError; n_candidates=True counted as 1."""
    build_index_from_documents([DOC], tmp_path / "idx", preset("tiny").retrieval,
                               progress=False)
    p = Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "idx",
                                        cache_dir=tmp_path / "cache"))
    for question, needle in ((42, "must be text \\(a str\\), got a int"),
                             (AskArgs("How long?"), "got a AskArgs"),
                             ("  ", "the question is empty")):
        with pytest.raises(InvalidRequestError, match=needle):
            p.ask(question)  # type: ignore[arg-type]
    for options, needle in (({"top_k": 2.5}, "top_k must be a whole number"),
                            ({"top_k": "2"}, "top_k must be a whole number"),
                            ({"n_candidates": True}, "n_candidates must be a whole number"),
                            ({"search_k": 5.0}, "search_k must be a whole number"),
                            ({"min_score": "0.5"}, "min_score must be a number")):
        with pytest.raises(InvalidRequestError, match=needle):
            p.ask("How long does the Moon take?", **options)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="k must be a whole number"):
        p.search("Moon", k=2.5)  # type: ignore[arg-type]
    assert p.search("Moon", k=1)[0].passage.doc_id == "moon"
    assert p.ask("How long does the Moon take?", top_k=1, min_score=0.0).question
    # numpy's numbers are numbers (a sweep over np.arange passes them)
    import numpy as np

    assert p.search("Moon", k=np.int64(1))[0].passage.doc_id == "moon"
    checked = p.check(AskArgs("How long?", top_k=np.int64(1), n_candidates=np.int32(2),
                              min_score=np.float32(0.5)))
    assert (checked.top_k, checked.n_candidates, checked.min_score) == (1, 2, 0.5)
    assert type(checked.top_k) is int and type(checked.min_score) is float
