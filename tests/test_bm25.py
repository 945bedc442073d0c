"""BM25Index against the reference rank_bm25.BM25Okapi, plus save/load round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_bm25 import BM25Okapi

from citeqa.errors import IndexError_
from citeqa.retrieval import BM25Index, tokenize
from citeqa.retrieval.bm25 import top_k_of

CORPUS_TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "the cat chased the dog around the garden",
    "a quick brown fox jumps over the lazy dog",
    "the the the the",
    "normans conquered england in 1066",
    "steam engines power the industrial revolution",
]
CORPUS = [tokenize(t) for t in CORPUS_TEXTS]  # "the" is in > half the docs: negative idf
QUERIES = [
    ["cat"],
    ["the"],  # only the epsilon-floored idf
    ["the", "cat", "the"],  # repeated terms count repeatedly
    ["cat", "cat", "cat"],
    ["unknown", "zzz"],  # unknown terms score 0
    ["dog", "unknown", "sat"],
    [],  # empty query
    ["normans", "1066", "england", "steam"],
]


def assert_parity(corpus: list[list[str]], query: list[str], **params: float) -> None:
    ours = BM25Index.build(corpus, **params)
    ref = BM25Okapi(corpus, **params)
    expected = ref.get_scores(query)
    got = ours.scores(query)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    k = min(3, len(corpus))
    ids, scores = ours.top_k(query, k)
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:k], rtol=1e-6, atol=1e-9)
    # ids agree wherever the reference's order is not a tie
    ref_order = np.argsort(-expected, kind="stable")[:k]
    for i, (a, b) in enumerate(zip(ids, ref_order, strict=True)):
        if np.isclose(expected, expected[b]).sum() == 1:
            assert a == b, (i, ids, ref_order, expected)


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: "+".join(q) or "empty")
def test_parity_inline_corpus(query: list[str]) -> None:
    assert_parity(CORPUS, query)


def test_negative_idf_is_floored_to_epsilon_times_mean() -> None:
    ref = BM25Okapi(CORPUS)
    ours = BM25Index.build(CORPUS)
    the = ours.term_ids["the"]
    assert ours.idf[the] == pytest.approx(ref.idf["the"])
    assert ours.idf[the] == pytest.approx(0.25 * ref.average_idf)
    assert ours.scores(["the"])[4] > 0  # doc 4 is all "the"


@pytest.mark.parametrize("params", [{"k1": 1.2, "b": 0.5, "epsilon": 0.1}, {"k1": 2.0, "b": 1.0}])
def test_parity_other_parameters(params: dict[str, float]) -> None:
    for query in QUERIES:
        assert_parity(CORPUS, query, **params)


def test_negative_mean_idf_gives_negative_floor() -> None:
    # every term occurs in most documents: the mean idf is negative, and so is the floor
    corpus = [["a", "b"], ["a", "b"], ["a", "c"], ["a", "b", "c"]]
    for query in (["a"], ["b"], ["c", "a"], ["b", "b"]):
        assert_parity(corpus, query)


def test_scores_touch_only_matching_postings() -> None:
    ours = BM25Index.build(CORPUS)
    assert ours.scores(["normans"]).nonzero()[0].tolist() == [5]


def test_top_k_clamps_and_breaks_ties_by_id() -> None:
    ours = BM25Index.build([["x"], ["y"], ["x"], ["z"], ["w"]])
    ids, scores = ours.top_k(["x"], 10)
    assert ids.tolist() == [0, 2, 1, 3, 4]
    assert scores[0] == scores[1] > 0
    assert scores[-1] == 0.0
    assert ours.top_k(["x"], 0)[0].size == 0


@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.integers(-2, 2), min_size=1, max_size=30), k=st.integers(0, 32))
def test_top_k_of_is_a_stable_sort_prefix(scores: list[int], k: int) -> None:
    """Ties by lower id at the cut too (argpartition chose among tied ids at random), so the k
    best are the first k of the k + 1 best."""
    values = np.array(scores, dtype=np.float64)
    ids, got = top_k_of(values, k)
    expected = np.argsort(-values, kind="stable")[:k]
    assert ids.tolist() == expected.tolist() and got.tolist() == values[expected].tolist()


def test_search_is_top_k_over_the_passages_a_query_term_is_in() -> None:
    corpus = [["a", "b"], ["a", "b"], ["a", "c"], ["a", "b", "c"]]  # a negative floor
    ours = BM25Index.build(corpus)
    for query in (["a"], ["b"], ["c", "a"], ["b", "b"], ["d"], ["zz"], []):
        scores = ours.scores(query)
        matched = [i for i, doc in enumerate(corpus) if set(query) & set(doc)]
        for k in range(7):
            ids, got = ours.search(query, k)
            expected = sorted(matched, key=lambda i: (-scores[i], i))[:k]
            assert ids.tolist() == expected, (query, k)
            np.testing.assert_array_equal(got, scores[expected])
    assert ours.search(["a"], 5)[1].max() < 0  # matched, with scores below 0


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path: Path, mmap: bool) -> None:
    ours = BM25Index.build(CORPUS)
    ours.save(tmp_path / "bm25")
    assert sorted(p.name for p in (tmp_path / "bm25").iterdir()) == [
        "counts.npy", "doc_ids.npy", "doc_len.npy", "idf.npy", "indptr.npy", "params.json",
        "tf.npy", "vocab.json"
    ]
    loaded = BM25Index.load(tmp_path / "bm25", mmap=mmap)
    assert isinstance(loaded.tf, np.memmap) == mmap
    for q in QUERIES:
        np.testing.assert_array_equal(loaded.scores(q), ours.scores(q))
    np.testing.assert_array_equal(loaded.counts, ours.counts)
    (tmp_path / "bm25" / "counts.npy").unlink()  # an index written before counts: it loads
    assert BM25Index.load(tmp_path / "bm25", mmap=mmap).counts is None


def test_stored_counts_give_the_term_counts_of_any_passages() -> None:
    """``counts_of`` (an update's source) against counting the passages' tokens again, and
    an index of kept + new passages from them against one built from their tokens."""
    from citeqa.retrieval.bm25 import concat_counts, count_terms

    index = BM25Index.build(CORPUS)
    for rows in ([], [0], [1, 3], list(range(len(CORPUS)))):
        got = index.counts_of(np.asarray(rows, dtype=np.int64))
        want = count_terms([CORPUS[r] for r in rows])
        np.testing.assert_array_equal(got.doc_len, want.doc_len)
        for i in range(len(rows)):
            mine = {got.vocab[t]: c for t, c in zip(got.terms[got.indptr[i]:got.indptr[i + 1]],
                                                     got.counts[got.indptr[i]:got.indptr[i + 1]],
                                                     strict=True)}
            theirs = {want.vocab[t]: c for t, c in zip(
                want.terms[want.indptr[i]:want.indptr[i + 1]],
                want.counts[want.indptr[i]:want.indptr[i + 1]], strict=True)}
            assert mine == theirs, rows
    new = [["zebra", "cat"], ["zebra", "zebra"]]
    kept = [1, 2, 3]
    updated = BM25Index.from_counts(concat_counts([index.counts_of(np.asarray(kept)),
                                                   count_terms(new)]))
    ref = BM25Index.build([*(CORPUS[r] for r in kept), *new])
    assert sorted(updated.vocab) == sorted(ref.vocab)
    for q in [*QUERIES, ["zebra"], ["cat", "zebra"]]:  # exactly, as README says
        np.testing.assert_array_equal(updated.scores(q), ref.scores(q))
    # the vocabulary in another order: its mean idf (the negative idfs' floor) differed in
    # the last digit, and so did every score of "alpha"
    base, extra = [["t0", "alpha"], ["t1", "beta", "alpha"]], [["t0", "alpha"], ["t1", "alpha"]]
    moved = BM25Index.from_counts(concat_counts([BM25Index.build(base).counts_of(np.array([1])),
                                                 count_terms(extra)]))
    np.testing.assert_array_equal(moved.scores(["alpha"]),
                                  BM25Index.build([base[1], *extra]).scores(["alpha"]))
    grown = BM25Index.from_counts(concat_counts([index.counts_of(np.arange(len(CORPUS))),
                                                 count_terms(new)]))
    whole = BM25Index.build([*CORPUS, *new])  # only grown: the very same arrays
    assert grown.vocab == whole.vocab
    for name in ("indptr", "doc_ids", "tf", "idf", "doc_len", "counts"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(whole, name), err_msg=name)
    with pytest.raises(ValueError, match="no term counts"):
        BM25Index(vocab=index.vocab, indptr=index.indptr, doc_ids=index.doc_ids, tf=index.tf,
                  idf=index.idf, doc_len=index.doc_len, params=index.params).counts_of(
                      np.asarray([0]))


def test_load_missing_directory_says_rebuild(tmp_path: Path) -> None:
    with pytest.raises(IndexError_, match="rebuild"):
        BM25Index.load(tmp_path / "nope")


_TOKENS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"])


@settings(max_examples=150, deadline=None)
@given(
    corpus=st.lists(st.lists(_TOKENS, min_size=0, max_size=12), min_size=1, max_size=25).filter(
        lambda c: any(c)  # rank_bm25 divides by zero on a corpus without any token
    ),
    query=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", "zz"]), max_size=6),
    k1=st.floats(0.5, 2.5),
    b=st.floats(0.0, 1.0),
    epsilon=st.floats(0.0, 0.5),
)
def test_parity_random_corpora(
    corpus: list[list[str]], query: list[str], k1: float, b: float, epsilon: float
) -> None:
    ours = BM25Index.build(corpus, k1=k1, b=b, epsilon=epsilon)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = BM25Okapi(corpus, k1=k1, b=b, epsilon=epsilon).get_scores(query)
    # rank_bm25 computes 0/0 = nan for an empty passage when b == 1 (its tf is 0): that term
    # contributes nothing, which is what we return
    expected = np.nan_to_num(expected, nan=0.0)
    # Terms of size ~0.1 summed in float32 cancel to ~1e-3 with an absolute error of ~1e-8
    # (hypothesis found 5e-9): atol is set by float32 term sizes, rtol by everything else.
    np.testing.assert_allclose(ours.scores(query), expected, rtol=1e-6, atol=5e-8)
    ids, scores = ours.top_k(query, 5)
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:5], rtol=1e-6, atol=5e-8)


# --------------------------------------------------------------------------- the tokenizer


def test_tokenizer_2_keeps_combining_marks_and_reads_nfd_as_nfc() -> None:
    """Version 1 split words at their combining marks: an NFD "café" was "cafe" (no match for
    a typed "café"), Hindi lost its vowel signs ("हिन्दी भाषा" was ह, न, द, भ, ष)."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Café naïve")
    assert tokenize(nfd) == tokenize("Café naïve") == ["café", "naïve"]
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert tokenize("שָׁלוֹם עוֹלָם") == ["שָׁלוֹם", "עוֹלָם"]  # Hebrew points
    assert tokenize(nfd, 1) == ["cafe", "nai", "ve"]  # version 1, as old indexes were made
    assert tokenize("हिन्दी", 1) == ["ह", "न", "द"]
    assert tokenize(nfd, 2) == ["café", "naïve"]  # version 2, as indexes of it were made
    with pytest.raises(ValueError, match="unknown tokenizer version"):
        tokenize("x", 6)


def test_tokenizer_3_pairs_the_characters_of_scripts_without_spaces_and_case_folds() -> None:
    """Han, kana and Hangul have no spaces between words: a run of ``\\w`` was a whole clause
    ("東京都は日本の首都であり"), which no question's words matched (BM25 found nothing for
    "東京タワー" in a passage holding it)."""
    assert tokenize("東京タワーは一九五八年に完成") == [
        "東京", "京タ", "タワ", "ワー", "ーは", "は一", "一九", "九五", "五八", "八年", "年に",
        "に完", "完成"]
    question, passage = tokenize("東京タワーはいつ完成しましたか"), tokenize(
        "東京都は日本の首都であり、東京タワーは一九五八年に完成しました。")
    assert {"東京", "タワ", "完成"} <= set(question) & set(passage)
    assert tokenize("2024年、故宫") == ["2024", "年", "故宫"]  # a lone one stands alone
    assert tokenize("서울은 한국의 수도") == ["서울", "울은", "한국", "국의", "수도"]
    assert tokenize("Straße STRASSE") == ["strasse", "strasse"]  # case-folded
    assert tokenize("東京タワー", 2) == ["東京タワー"] and tokenize("Straße", 2) == ["straße"]


def test_tokenizer_4_reads_full_and_half_width_forms_as_what_they_stand_for() -> None:
    """Japanese text writes digits (and often Latin letters) full-width, and old text kana
    half-width: BM25 found nothing for 1927 in "１９２７年", nor カタカナ in "ｶﾀｶﾅ"."""
    assert tokenize("１９２７年に完成") == ["1927", "年に", "に完", "完成"]
    assert tokenize("ｶﾀｶﾅ") == tokenize("カタカナ") == ["カタ", "タカ", "カナ"]
    assert tokenize("ＰＡＲＩＳ ① x²") == ["paris", "1", "x2"]
    assert tokenize("ﾊﾞｽ") == tokenize("バス")  # a half-width voicing mark joins its kana
    assert tokenize("１９２７年", 3) == ["１９２７", "年"]  # version 3, as indexes of it were made
    assert tokenize("Straße café") == tokenize("Straße café", 3)


def test_tokenizer_5_reads_a_symbol_written_in_letters_as_a_word_of_its_own() -> None:
    """NFKC writes ™ as TM: version 4 read "Acme™" as one word, acmetm, which a search for Acme
    never found (nor Core in "Intel® Core™ i7", nor 5 in "5㎏")."""
    assert tokenize("Acme™ and Intel® Core™ i7, 5㎏") == [
        "acme", "tm", "and", "intel", "core", "tm", "i7", "5", "kg"]
    assert tokenize("Acme™", 4) == ["acmetm"]  # version 4, as indexes of it were made
    index = BM25Index.build([tokenize("Acme™ ships rockets."), tokenize("Other text.")])
    assert index.search(tokenize("Acme"), 2)[0][:1].tolist() == [0]
    # a mark, full-width letters, superscript digits and punctuation read as in version 4
    for text in ("cafe\u0301 x\u0308", "ＰＡＲＩＳ ① x² ½", "a（b）c、d。", "東京タワー㍿"):
        assert tokenize(text) == tokenize(text, 4) or text == "東京タワー㍿", text
    assert tokenize("トヨタ㍿") == ["トヨ", "ヨタ", "株式", "式会", "会社"]  # (4: "タ株" too)
    # a stand-in for one letter stays in its word, as in version 4: Kangxi radicals of PDF
    # text (⼤ for 大) kept their pairs, circled letters their word
    for text in ("東京⼤学の⼊学試験", "ⓉⒺⓈⓉ", "\U0001f143\U0001f134\U0001f142\U0001f143"):
        assert tokenize(text) == tokenize(text, 4), text
    assert tokenize("東京⼤学") == ["東京", "京大", "大学"] and tokenize("ⓉⒺⓈⓉ") == ["test"]
    # variation selectors are no words, nor do they part one: "™️", an ideograph's variant
    assert tokenize("Acme\u2122\ufe0f rockets \u2764\ufe0f") == ["acme", "tm", "rockets"]
    assert tokenize("\u845b\U000e0100\u98fe\u533a") == tokenize("\u845b\u98fe\u533a")
    assert tokenize("x\u2122\u0303") == ["x", "tm\u0303"]  # a symbol's marks go with it
    # a dotted capital I: case folding wrote i and a combining dot
    assert tokenize("\u0130stanbul") == tokenize("Istanbul") == ["istanbul"]


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60))
def test_every_tokenizer_reads_ascii_alike(text: str) -> None:
    """An index of English text holds the same terms whichever version built it."""
    assert (tokenize(text) == tokenize(text, 4) == tokenize(text, 3) == tokenize(text, 2)
            == tokenize(text, 1))


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60)
       | st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd", "Zs", "Po")),
                 max_size=40))
def test_tokenizer_2_is_version_1_wherever_no_combining_mark_is(text: str) -> None:
    """ASCII and NFC text without marks tokenize as before: an index built before tokenizer 2
    and one built after hold the same terms for such text."""
    import unicodedata

    if any(unicodedata.category(c)[0] == "M" for c in unicodedata.normalize("NFC", text.lower())):
        return  # lowercasing can make one ("İ" -> "i" + U+0307)
    if unicodedata.is_normalized("NFC", text.lower()):
        assert tokenize(text, 2) == tokenize(text, 1)


def test_an_index_records_its_tokenizer_and_one_without_the_record_is_version_1(
        tmp_path: Path) -> None:
    from citeqa.text import TOKENIZER

    built = BM25Index.build(CORPUS)
    assert built.tokenizer == TOKENIZER == 5 and built.params["tokenizer"] == 5
    built.save(tmp_path / "bm25")
    params = json.loads((tmp_path / "bm25" / "params.json").read_text())
    del params["tokenizer"]  # as an index written before tokenizer versions
    (tmp_path / "bm25" / "params.json").write_text(json.dumps(params))
    assert BM25Index.load(tmp_path / "bm25").tokenizer == 1
