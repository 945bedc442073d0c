"""chunk_document: spans are trimmed, bounded, ordered, cover every non-space character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.config import ChunkConfig
from citeqa.retrieval import chunk_document, tokenize
from citeqa.retrieval.chunk import _hard_split
from citeqa.text import fenced_code


def check_invariants(text: str, spans: list[tuple[int, int]], cfg: ChunkConfig) -> None:
    covered = [False] * len(text)
    prev_start, prev_end = -1, 0
    for start, end in spans:
        piece = text[start:end]
        assert 0 <= start < end <= len(text), (start, end)
        assert end - start <= cfg.max_chars, (start, end, cfg.max_chars)
        assert piece == piece.strip() and piece, repr(piece)
        assert start > prev_start, (prev_start, start)  # in order, no repeats
        if cfg.overlap_sentences == 0:
            assert start >= prev_end, (prev_end, start)  # disjoint
        prev_start, prev_end = start, end
        for i in range(start, end):
            covered[i] = True
    missed = [i for i, c in enumerate(text) if not c.isspace() and not covered[i]]
    assert not missed, (missed[:5], text)


def test_sentences_packed_up_to_max_chars() -> None:
    text = "One two. Three four five. Six! Seven eight nine ten?"
    spans = chunk_document(text, ChunkConfig(max_chars=26))
    assert [text[s:e] for s, e in spans] == [
        "One two. Three four five.",
        "Six! Seven eight nine ten?",
    ]


def test_short_text_is_one_trimmed_passage() -> None:
    text = "  \n A single short sentence. Another.\n\n"
    assert [text[s:e] for s, e in chunk_document(text, ChunkConfig())] == [
        "A single short sentence. Another."
    ]


def test_paragraph_break_ends_a_substantial_passage() -> None:
    text = "First paragraph has some words.\n\nSecond paragraph here, a little longer."
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=100))]
    assert pieces == ["First paragraph has some words.", "Second paragraph here, a little longer."]
    # but not before a short rest of the text that fits: a last line alone ("Home", "See also
    # X.") was a passage of its own (a docs review: 9 of the Valgrind manual's)
    for rest in ("See also X.", "Home"):
        text = f"First paragraph has some words.\n\n{rest}"
        assert chunk_document(text, ChunkConfig(max_chars=100)) == [(0, len(text))]
    text = "First paragraph has some words.\n\nSecond one.\n\nThird one, a bit longer too."
    assert len(chunk_document(text, ChunkConfig(max_chars=100))) == 2  # (a rest of 41)
    # a tiny heading stays with the paragraph that follows
    text = "Intro\n\nThe body of the section follows the heading."
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=100))]
    assert pieces == [text]


def test_long_sentence_hard_split_at_whitespace() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta"
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=12))]
    assert pieces == ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    assert " ".join(pieces) == text


def test_word_longer_than_max_is_cut_mid_word() -> None:
    text = "abcdefghij xy"
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=4))]
    assert pieces == ["abcd", "efgh", "ij", "xy"]


def test_text_without_spaces_is_cut_at_sentences_then_clauses_never_before_a_mark() -> None:
    """Japanese and Chinese write no space between words or after 。: a paragraph was one
    "sentence", cut mid-word every max_chars characters."""
    one, two = "東京は日本の首都です。", "人口は約千四百万人です。"
    text = one + two + one
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=24))]
    assert pieces == [one + two, one]  # at a sentence's end
    for comma in ("、", "，"):  # Japanese, Chinese
        clauses = f"東京は首都であり{comma}" * 3 + "人口が多い"
        pieces = [clauses[s:e] for s, e in chunk_document(clauses, ChunkConfig(max_chars=20))]
        assert pieces == [f"東京は首都であり{comma}" * 2, f"東京は首都であり{comma}人口が多い"]
    # a Latin word near its start: cut at the clause's comma, not after "Apple" (a piece of 7)
    latin = "Apple は会社であり、東京は首都であり、" * 3
    pieces = [latin[s:e] for s, e in chunk_document(latin, ChunkConfig(max_chars=22))]
    assert pieces == ["Apple は会社であり、東京は首都であり、"] * 3, pieces
    marked = "ka\u0301" * 10  # NFD: a letter and its combining accent
    spans = chunk_document(marked, ChunkConfig(max_chars=5))
    assert all(marked[s] != "\u0301" for s, _ in spans), [marked[s:e] for s, e in spans]
    check_invariants(marked, spans, ChunkConfig(max_chars=5))
    # a run of marks longer than half a window is cut at the window's end: pieces stay full
    # (it was cut one character a piece, each rescanning its window: quadratic, though the
    # passages, pieces joined again, came out the same)
    zalgo = "a" + "\u0301" * 9_999
    assert [e - s for s, e in _hard_split(zalgo, 0, len(zalgo), 100)] == [100] * 100
    spans = chunk_document(zalgo, ChunkConfig(max_chars=100))
    assert [e - s for s, e in spans] == [100] * 100
    check_invariants(zalgo, spans, ChunkConfig(max_chars=100))
    for text, size in (("xyza\u0301\u0301bcde\u0301\u0301f", 4), ("ab\u0301cd\u0301ef", 2)):
        pieces = [text[s:e] for s, e in _hard_split(text, 0, len(text), size)]  # (a run of
        assert not any(p[0] == "\u0301" for p in pieces), pieces  # half a window: as before)
    mixed = ("x" + "\u0301" * 30) * 10  # shorter runs: cut before their letter, as before
    spans = chunk_document(mixed, ChunkConfig(max_chars=100))
    assert all(mixed[s] == "x" for s, _ in spans) and len(spans) == 4, spans


def test_overlap_repeats_previous_sentences() -> None:
    text = "S one. S two. S three. S four."
    cfg = ChunkConfig(max_chars=16, overlap_sentences=1)
    pieces = [text[s:e] for s, e in chunk_document(text, cfg)]
    assert pieces == ["S one. S two.", "S two. S three.", "S three. S four."]
    # overlap that would not fit beside the next new sentence is dropped
    cfg = ChunkConfig(max_chars=14, overlap_sentences=1)
    pieces = [text[s:e] for s, e in chunk_document(text, cfg)]
    assert pieces == ["S one. S two.", "S three.", "S four."]


def test_empty_and_whitespace_text_give_no_passages() -> None:
    assert chunk_document("", ChunkConfig()) == []
    assert chunk_document(" \n\t ", ChunkConfig()) == []


def test_invalid_max_chars() -> None:
    from citeqa.errors import ConfigError

    with pytest.raises(ConfigError, match="max_chars"):
        chunk_document("text", ChunkConfig(max_chars=0))


_ALPHABET = st.sampled_from(list("ab c.!?\n\t\"')xé") + ["  ", "\n\n", ". ", "é"])


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(_ALPHABET, max_size=200).map("".join),
    max_chars=st.integers(1, 60),
    overlap=st.integers(0, 3),
)
def test_invariants_on_random_text(text: str, max_chars: int, overlap: int) -> None:
    cfg = ChunkConfig(max_chars=max_chars, overlap_sentences=overlap)
    check_invariants(text, chunk_document(text, cfg), cfg)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300), max_chars=st.integers(1, 80))
def test_invariants_on_arbitrary_unicode(text: str, max_chars: int) -> None:
    cfg = ChunkConfig(max_chars=max_chars)
    spans = chunk_document(text, cfg)
    check_invariants(text, spans, cfg)
    # no word is lost: the passages' tokens, in order, are the text's (words may be cut only
    # when longer than max_chars, so compare at max_chars large enough)
    if max_chars >= max((len(w) for w in text.split()), default=0):
        assert [t for s, e in spans for t in tokenize(text[s:e])] == tokenize(text)


# The sentence-break pattern before it was made linear: the same matches on any text.
_QUADRATIC_BREAK = r"(?<=[.!?])[\"')\]\u201d\u2019]*\s+|\s*[\n\r\x85\u2028\u2029]\s*"


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("ab .!?\"')\n\t\r\x0b\x85\u2028\u2029\u201d")),
               max_size=60))
def test_sentence_breaks_are_those_of_the_quadratic_pattern(text: str) -> None:
    import re

    from citeqa.text import _SENTENCE_BREAK

    old = [m.span() for m in re.finditer(_QUADRATIC_BREAK, text)]
    assert [m.span() for m in _SENTENCE_BREAK.finditer(text)] == old


@pytest.mark.parametrize(("gap", "paragraph"), [
    ("\n", False), ("\r", False), ("\r\n", False), ("\u2028", False), ("\x85", False),
    ("\n\n", True), ("\r\r", True), ("\r\n\r\n", True), ("\u2028\u2028", True),
    ("\x85 \x85", True), ("\u2029", True), ("\r\n \t", False)])
def test_every_line_break_ends_a_sentence_and_two_a_paragraph(gap: str, paragraph: bool) -> None:
    """A heading without a full stop on a line of its own is a sentence, whatever ends its line
    (a CR alone, as old Mac files, or U+2028/U+2029, as word processors write): it was joined to
    the next sentence and quoted with it."""
    from citeqa.text import sentences

    text = "Chapter One" + gap + "The ferry leaves at dawn."
    assert [(text[s.start:s.end], s.paragraph_start) for s in sentences(text)] == [
        ("Chapter One", False), ("The ferry leaves at dawn.", paragraph)]


LONG = "The generator writes its output in two lines: an answer line and a"  # 67 characters


@pytest.mark.parametrize(("text", "expected"), [
    # hard-wrapped prose: one sentence across its lines (it was "The" and the rest, per line)
    (f"{LONG}\nquote line, wrapped at seventy-two columns or so. The\nconstraint is compiled.",
     [f"{LONG}\nquote line, wrapped at seventy-two columns or so.",
      "The\nconstraint is compiled."]),
    (f"{LONG}\r\nquote line.", [f"{LONG}\r\nquote line."]),
    (f"{LONG}\n1889 was the year.", [f"{LONG}\n1889 was the year."]),
    # a line of its own: after a short line, before a capital, a list item, a heading, a
    # quotation, a table row or a fence; or a blank line between
    ("Chapter one\nthe ferry leaves at dawn.", ["Chapter one", "the ferry leaves at dawn."]),
    (f"{LONG}\nQuote line.", [LONG, "Quote line."]),
    *((f"{LONG}\n{start}next line.", [LONG, f"{start}next line."])
      for start in ("- ", "* ", "+ ", "\u2022 ", "12) ", "# ", "> ", "| ")),
    (f"{LONG}\n1. next line.", [LONG, "1.", "next line."]),  # (no list starts after prose)
    (f"{LONG}:\n  12. Next line.\n3. last", [f"{LONG}:", "12. Next line.", "3. last"]),
    (f"{LONG}\n```\nnext line.", [LONG, "```", "next line."]),
    (f"{LONG}\n\nquote line.", [LONG, "quote line."]),
    # a heading or table row wraps nothing, however long
    (f"## {LONG}\nquote line.", [f"## {LONG}", "quote line."]),
    (f"| {LONG} |\n| 2 |", [f"| {LONG} |", "| 2 |"]),
])
def test_a_line_break_that_only_wraps_prose_ends_no_sentence(text: str,
                                                             expected: list[str]) -> None:
    from citeqa.text import sentences

    assert [text[s.start:s.end] for s in sentences(text)] == expected


@pytest.mark.parametrize("max_chars", [300, 600, 1000])
def test_a_heading_goes_with_the_section_it_names(max_chars: int) -> None:
    """A paragraph break may end a passage once it holds a quarter of max_chars: a heading
    just past that point ended one ("...coats.\\n\\n## Plains zebra"), cut off from its
    section, which the next passage held without the heading that names its subject."""
    intro = ("Zebras are African equines with black-and-white striped coats. " * 4)[:236]
    facts = " ".join(f"Fact {i} about this species is noted here." for i in range(20))
    text = f"# Zebra\n\n{intro}.\n\n## Plains zebra\n\n{facts}\n\n## Grevy's zebra\n\n{facts}"
    spans = chunk_document(text, ChunkConfig(max_chars=max_chars))
    check_invariants(text, spans, ChunkConfig(max_chars=max_chars))
    for heading in ("## Plains zebra", "## Grevy's zebra"):
        [held] = [text[s:e] for s, e in spans if heading in text[s:e]]
        assert f"{heading}\n\nFact 0 " in held, (heading, held)


@pytest.mark.parametrize("between", ["\n", "\n\n"])
def test_headings_stacked_or_on_the_line_above_their_text_go_with_it(between: str) -> None:
    """A full passage gave its last heading to the next one, not a heading above that (# Setup
    over ## Installation), nor a "# " heading with its text on the next line."""
    sentence = "Run the installer " + "and then wait for it to finish " * 11 + "now."
    for headings in ("## Installation", "# Setup\n\n## Installation"):
        text = f"The tool has two parts. Both are needed for it to work.\n\n{headings}{between}" \
               f"{sentence} Then reboot."
        spans = chunk_document(text, ChunkConfig(max_chars=400))
        assert text[spans[0][0]:spans[0][1]].endswith("to work."), spans
        assert text[spans[1][0]:spans[1][1]].startswith(headings.split("\n")[0]), spans


@pytest.mark.parametrize(("line", "heading"), [
    ("Installation (Linux)", True), ("Why \u201cquotes\u201d", True), ("Setup [beta]", True),
    ("He left.)", False), ("R\u00e9sum\u00e9 \uff0e", False), ("It is done;", False),
    ('She said "go."', False), ("\u5b8c\u6210\u3002\u300d", False),
    ("Dear customer,", False),
])
def test_a_heading_and_a_title_are_one_rule(line: str, heading: bool) -> None:
    """Chunking read a line ending in a bracket or a quote as a sentence (a section's
    "Installation (Linux)" was cut off from it) while the title rule read it as a heading;
    the title rule missed the full-width stops chunking knew."""
    from citeqa.ingest.title import title_from_text

    sentence = "Run the installer " + "and then wait for it to finish " * 11 + "now."
    text = f"The tool has two parts. Both are needed for it to work.\n\n{line}\n\n" \
           f"{sentence} Then reboot."
    spans = chunk_document(text, ChunkConfig(max_chars=400))
    assert text[spans[1][0]:spans[1][1]].startswith(line) is heading, spans
    assert (title_from_text(f"{line}\n\nBody.", "fallback") == line) is heading


@pytest.mark.parametrize("heading", [
    "Usage\n-----", "Usage\n^^^^^", "Usage\n=====", "=====\nUsage\n=====", "## Usage"])
def test_an_underlined_heading_goes_with_its_section_as_a_hashed_one_does(heading: str) -> None:
    """A setext or reStructuredText heading (its text, then a rule under it, over it too) read as
    two sentences, neither a heading: a full passage ended with it, cut off from its section
    (a docs review: 14 of CMake's command pages' passages, and the orphan ranked first)."""
    fox = "The quick brown fox jumps over the lazy dog near the river bank today. "
    text = ("Guide\n=====\n\nRun the installer with the --prefix option to choose a target "
            f"folder on this disk. {fox * 2}\n\n{heading}\n\nCall the tool with a file name. "
            + " ".join(f"Sentence {i} explains one more detail here." for i in range(20)))
    cfg = ChunkConfig(max_chars=1000)  # (the intro is under a quarter of it: no break after it)
    spans = chunk_document(text, cfg)
    check_invariants(text, spans, cfg)
    [held] = [text[s:e] for s, e in spans if "Usage" in text[s:e]]
    assert f"{heading}\n\nCall the tool" in held, spans


def test_an_underlined_heading_is_never_cut_between_its_text_and_its_rule() -> None:
    """The back-off over a full passage's last headings could stop inside an underlined one:
    'CPack Bundle Generator' ended a passage, its underline began the next (13 times in
    CMake's docs at 300 characters)."""
    para = ("The bundle generator builds a disk image holding one application, its "
            "resources and a launcher, for systems of that kind. ")
    for heading in ("CPack Bundle Generator\n----------------------",
                    "======================\nCPack Bundle Generator\n======================"):
        text = f"{para}\n\n{heading}\n\n{para * 3}"
        for max_chars in range(150, 420, 10):
            cfg = ChunkConfig(max_chars=max_chars)
            spans = chunk_document(text, cfg)
            check_invariants(text, spans, cfg)
            assert any(heading in text[s:e] for s, e in spans), (max_chars, spans)


def test_code_fences_are_no_heading_rules_and_rst_tildes_no_fences() -> None:
    """A one-line code block between bare fences read as an overlined heading (its fences the
    rules), and a reStructuredText underline of ~ opened a code fence that ran to the next one
    (37-87 % of such files' text, read as one code block, paragraphs joined across)."""
    sentence = "Configuration is read from the file " + "and more words here " * 12 + "end."
    text = f"To install it, run:\n\n```\npip install citeqa\n```\n\n{sentence}"
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=300))]
    assert pieces[0] == "To install it, run:\n\n```\npip install citeqa\n```", pieces
    para = ("Some paragraph text that is about a hundred and sixty characters long, written "
            "here to fill the space of one paragraph for this test.")
    text = (f"Title\n=====\n\nSection A\n~~~~~~~~~\n\n{para}\n\n{para}\n\n"
            f"Section B\n~~~~~~~~~\n\n{para}\n\n{para}")
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=400))]
    assert all(p.endswith("test.") and p.count(para) == 1 for p in pieces), pieces
    assert pieces[2].startswith("Section B\n~~~~~~~~~\n\n"), pieces
    # a fence with its language right under text is still a fence (CommonMark)
    md = "Run this:\n~~~python\nx = 1\n\ny = 2\n~~~\n\nThen read the output."
    pieces = [md[s:e] for s, e in chunk_document(md, ChunkConfig(max_chars=40))]
    assert pieces == ["Run this:\n~~~python\nx = 1\n\ny = 2\n~~~", "Then read the output."]
    # a line of ~ between blank lines is a reStructuredText transition: no fence either
    text = f"{para}\n\n~~~~~~~~\n\n{para}\n\n{para}\n\n{para}"
    pieces = [text[s:e] for s, e in chunk_document(text, ChunkConfig(max_chars=400))]
    assert all(p.count(para) == 1 for p in pieces), pieces
    assert fenced_code(text, tilde_underlines=True) == []
    assert fenced_code("``` not a fence ``` text\n# Heading\n") == []  # (backticks after it)
    bare = "Run this:\n\n~~~\nx = 1\n\ny = 2\n~~~\n\nThen read the output."
    assert fenced_code(bare, tilde_underlines=True) == [(11, 31)]


def test_a_blank_line_in_fenced_code_ends_no_passage() -> None:
    """A paragraph break inside a fenced code block ended a passage: half a 300-character
    example in one passage, its rest in the next (90 such blocks in Node's API docs)."""
    intro = "The storage keeps a value for the duration of an asynchronous operation. " * 2
    code = ("```js\nconst store = new AsyncLocalStorage();\n\n"
            "store.run(42, () => {\n  console.log(store.getStore());\n});\n\n"
            "// prints 42 from inside the callback\n```")
    text = f"{intro}\n\n{code}\n\n" + "Other text follows here after the code. " * 12
    cfg = ChunkConfig(max_chars=400)
    spans = chunk_document(text, cfg)
    check_invariants(text, spans, cfg)
    assert any(code in text[s:e] for s, e in spans), [text[s:e] for s, e in spans]
    # an unclosed fence runs to the end; a rule after a paragraph is no underline
    unclosed = "A.\n\n```\nx\n\ny"
    assert chunk_document(unclosed, cfg) == [(0, len(unclosed))]
    rule = "First part of the text, long enough to matter here. " * 3 + "\n\n---\n\nNext."
    assert not any(text.endswith("---") for text in
                   [rule[s:e] for s, e in chunk_document(rule, ChunkConfig(max_chars=150))])


def test_a_list_of_short_lines_is_not_cut_a_line_a_passage() -> None:
    """A full passage left all its last heading-like paragraphs to the next: in a release
    note's list of API names, one per line, that was every line, so 1 KB became 16 passages of
    one name each (found on Rust's releases.html)."""
    items = "\n\n".join(f"std::ffi::OsStr::method_number_{i:02d}" for i in range(24))
    text = ("These APIs are now stable:\n\n" + items + "\n\nAllow version-prefixes in pkgid's "
            "(e.g. --package flags) to resolve ambiguities\n\nThe compiler now "
            + "checks more things " * 30 + "than before.")
    cfg = ChunkConfig(max_chars=1000)
    spans = chunk_document(text, cfg)
    check_invariants(text, spans, cfg)
    assert len(spans) == 2, [text[s:e] for s, e in spans]


def test_a_long_run_of_spaces_is_one_sentence_gap() -> None:
    """64 K spaces without a line break: each start inside the run once rescanned the whole run
    (~6 s here for one document); now one pass."""
    from citeqa.text import sentences

    text = "a" + " " * 64_000 + "b.\n\nc"
    spans = [(s.start, s.end) for s in sentences(text)]
    assert spans == [(0, 64_003), (64_005, 64_006)]


def test_marked_headings_stay_with_their_sections_however_they_end() -> None:
    """Found on real documentation folders: a heading that asks ("## How do I ...?", a FAQ's
    underlined "Q: Does ...?"), one with a stop inside ("## Step 2. Install it": two sentences,
    neither read as a heading) and a changelog's "## 1.2.1" right under a list (CommonMark: a
    block of its own) each ended a passage, its section in the next; asked the question, the
    generator quoted it back from there, and was answered."""
    intro = "Log in first; the token is kept in your home folder for later runs."
    body = "Set HTTPS_PROXY in the environment before running the tool; it is read at start. "
    cfg = ChunkConfig(max_chars=300)
    for heading, markdown in (("## How do I configure the proxy?", True),
                              ("## Step 2. Configure the proxy", True),
                              ("# Step 2. Configure the proxy.", True),
                              ("Q: Does the tool read a proxy?\n" + "-" * 30, False),
                              ("Step 2. Configure the proxy\n" + "=" * 27, False),
                              ("Configure the proxy (see \"Setup\")?", False)):
        for text in (f"{intro}\n\n{heading}\n\n{body}", f"{intro}\n\n{heading}\n\n{body * 3}",
                     f"{intro}\r\r{heading}\r\r{body}".replace("\n", "\r")):  # (old Mac)
            spans = chunk_document(text, cfg, markdown=markdown)
            check_invariants(text, spans, cfg)
            pieces = [text[s:e] for s, e in spans]
            sep = "\r\r" if "\r" in text else "\n\n"
            assert any(f"{heading}{sep}{body.strip()}".replace("\n", sep[0]) in p
                       for p in pieces), pieces
    items = "* item added here for the release notes of this product\n" * 5
    text = items + "## 1.2.1\n\n* python-build: Add CPython 3.6.4\n* python-build: Add PyPy 5.10\n"
    spans = chunk_document(text, cfg, markdown=True)
    check_invariants(text, spans, cfg)
    assert [text[s:e] for s, e in spans][1].startswith("## 1.2.1\n\n* python-build"), spans
    # a "#" heading's line is one unit only while short: a long one is still packed and cut
    long = "## " + "Step. " * 100 + "\n\n" + body * 2
    check_invariants(long, chunk_document(long, cfg, markdown=True), cfg)
    # outside Markdown, a "#" line is a comment: a config file's block of them is not cut a
    # line a passage (gnupg's trustlist.txt: 13 passages were 18, most of one line)
    comments = "\n".join(f"# comment line {i}: this option sets the port the daemon listens on"
                          for i in range(8))
    assert len(chunk_document(comments, cfg)) == 2
    comments = "\n\n".join(f"# Option {i} sets the port the daemon listens on." for i in range(8))
    assert [e - s for s, e in chunk_document(comments, cfg)] == [96] * 4  # (as prose is)
    # a line between two rules ending as prose does is no heading (git-jump's example)
    intro = "Running it in this repository, the command would return:"
    example = (f"{intro}\n\n-----\nfoo.c:2:9: printf(\"%s\", x);\n-----\n\n"
               + "More text follows here after the example. " * 6)
    pieces = [example[s:e] for s, e in chunk_document(example, ChunkConfig(max_chars=120))]
    assert pieces[0].startswith(f"{intro}\n\n-----\nfoo.c"), pieces


def test_a_markdown_files_passages_of_markup_alone_are_left_out() -> None:
    """Of real READMEs, 35 of 968 passages were badges, logos or link definitions, and search
    ranked them first ("How do I install pillow?": 3 of the top 5)."""
    from citeqa.retrieval.chunk import passage_spans
    from citeqa.types import Document

    badges = ('[![ci](https://ci.example/badge.svg)](https://ci.example)\n'
              '<p align="center"><img src="logo.png" alt="Proj"></p>\n<!-- sponsors -->')
    defs = "[1]: https://example.org/one\n[docs]: https://example.org/docs"
    prose = "Proj reads the files of a folder and answers questions about them, citing them."
    text = f"{badges}\n\n{prose}\n\n{defs}\n\n- [Install](#install)\n- [Usage](#usage)"
    cfg = ChunkConfig(max_chars=150)
    spans = chunk_document(text, cfg)
    assert len(spans) == 4
    for source in ("docs/README.md", "https://example.org/r/guide.MDX?x=1", "C:\\d\\a.md"):
        kept = [text[s:e] for s, e in passage_spans(Document("d", "t", source, text), cfg)]
        assert kept == [prose, "- [Install](#install)\n- [Usage](#usage)"], (source, kept)
    for source in ("notes.txt", "https://example.org/md", "page.html"):  # not Markdown
        assert passage_spans(Document("d", "t", source, text), cfg) == spans
    only = Document("d", "t", "a.md", f"{badges}\n\n{defs}")  # markup alone: all of it kept
    assert passage_spans(only, cfg) == chunk_document(only.text, cfg)


def test_a_markdown_passage_with_code_a_link_definition_or_angle_brackets_is_kept() -> None:
    """The review's: a link definition's rule ran to the text's end (a passage after one was
    no one's read words: left out, and unsearchable), a footnote was read as a link definition,
    a code block of HTML was markup no one reads, "i < n. ... i > n." a tag over paragraphs, an
    "export" line of prose MDX's markup."""
    from citeqa.retrieval.chunk import passage_spans
    from citeqa.types import Document

    prose = "Zebra quartz settings are read from the file at start, then kept for the run. "
    cfg = ChunkConfig(max_chars=200)
    for middle in ("[inst]: https://example.com/installer\n\n" + prose,
                   "```\n" + '<div class="zebra">\n  <img src="quartz.png">\n</div>\n' * 3
                   + "```",
                   "[^1]: The zebra quartz standard, ISO 1234, says so."):
        text = f"# Guide\n\n{prose * 2}\n\n{middle}\n\n{prose * 2}"
        doc = Document("d", "t", "guide.md", text)
        assert passage_spans(doc, cfg) == chunk_document(text, cfg, markdown=True), middle
    from citeqa.markdown import read_words, unread_out
    for prose_ in ("i < n.\n\nZebra quartz is read.\n\ni > n.", "export ZEBRA=1 to read it",
                   "[Breaking]: the config file moved to the home folder in release two.",
                   "import the data from 'sales.csv' into the zebra table"):
        assert unread_out(prose_) == prose_ and read_words(prose_)
    # markup over lines: no words a reader reads (the last review: read at once as words)
    for markup in ("<!--\nThis file is generated; do not edit.\n-->",
                   '<p align="center">\n  <img\n    src="logo.png"\n    alt="Logo"\n  >\n</p>',
                   '![logo](https://x.org/a.png\n  "Project logo")', "[1]: https://x.org 'One'",
                   "import X from './x'\nimport { a, b } from 'c';\nimport './s.css'"):
        assert not read_words(markup), markup
        assert not read_words(markup.replace("\n", "\r\n") + "\r\n"), markup  # (CRLF's too)
    # in Markdown, "~~~" right under a line of text opens a fence (no heading is underlined so)
    md = ("Edit the zebra configuration file:\n~~~\n# the port\nport = 8080\n\n# the host\n"
          "host = example.org\n~~~\n\n" + "Then start it and watch it run. " * 6)
    pieces = [md[s:e] for s, e in passage_spans(Document("d", "t", "a.md", md), cfg)]
    assert any("port = 8080\n\n# the host\nhost = example.org\n~~~" in p for p in pieces), pieces


def test_a_markdown_files_front_matter_is_in_no_passage() -> None:
    """A Jekyll or Hugo page's front matter ("layout: post", "date:", "tags:") was indexed with
    its first passage, and could be quoted: it names the title (``ingest/title.py``), no more."""
    from citeqa.retrieval.chunk import passage_spans
    from citeqa.types import Document

    prose = "The proxy reads its settings from proxy.toml at start."
    cfg = ChunkConfig(max_chars=400)
    for front in ('---\nlayout: post\ntitle: "Tuning"\ntags: [net]\n---',
                  "---\r\nlayout: post\r\n...", '+++\ntitle = "Tuning"\ndate = 2024-03-01\n+++'):
        text = f"{front}\n\n{prose}\n\n## Limits\n\nBodies over 10 MB are refused."
        pieces = [text[s:e] for s, e in passage_spans(Document("d", "t", "p.md", text), cfg)]
        assert pieces == [f"{prose}\n\n## Limits\n\nBodies over 10 MB are refused."], pieces
        plain = passage_spans(Document("d", "t", "p.txt", text), cfg)  # (not Markdown: as is)
        assert text[plain[0][0]:].startswith(front[:3]), plain
    alone = "---\ntitle: Empty page\n---\n"  # front matter alone: the page is itself
    assert passage_spans(Document("d", "t", "p.md", alone), cfg) == [(0, len(alone) - 1)]
    rule = f"{prose}\n\n---\n\nlayout: kept\n\n---"  # "---" past the start: a rule, and read
    assert len(passage_spans(Document("d", "t", "p.md", rule), cfg)) == 1
    # the fix review's: a rule over prose, then another, is no front matter (the intro was
    # left out); nor is TOML's +++ closed by YAML's "..."
    for text in ("---\nIntro paragraph about the widget.\n\n---\n\nSecond section here.\n",
                 "---\nIntro paragraph.\n...\n\nMore.", "+++\ntitle = 'x'\n...\n\nMore."):
        spans = passage_spans(Document("d", "t", "p.md", text), cfg)
        assert text[spans[0][0]:].startswith(text[:3]), (text, spans)
    meta = ('---\ntitle: "A: B"\ntags:\n  - net\n- top\n# note\n\nlist: [a]\n---\n'
            '+++\n[extra]\nkey = 1\n+++\n')  # each line metadata's: blanked
    text = meta + prose
    pieces = [text[s:e] for s, e in passage_spans(Document("d", "t", "p.md", text), cfg)]
    assert not any("title:" in p or "- top" in p for p in pieces), pieces
    assert "[extra]" in pieces[0] and prose in pieces[-1], pieces  # (only the first block is)
    # after a byte-order mark (Windows editors write one): its front matter was a passage; no
    # passage starts with the mark (kept in the text: offsets are the file's)
    for name, text, first in (("p.md", f"\ufeff{meta}{prose}", "+++\n[extra]"),
                              ("p.txt", f"\ufeff{prose}", prose), ("p.md", "\ufeff# T\n\nx y.",
                                                                   "# T\n\nx y.")):
        spans = passage_spans(Document("d", "t", name, text), cfg)
        assert text[spans[0][0]:spans[0][1]].startswith(first), (text, spans)


def test_a_markdown_passage_of_headings_and_markup_alone_is_left_out() -> None:
    """A README's "# Name" over its badge block kept that passage (the heading's words), and
    BM25 ranked it first for the project's name: its quote says nothing, and the name is the
    title, indexed with every passage. Of a real folder's 941 passages, 8 were so."""
    from citeqa.markdown import headings_out
    from citeqa.retrieval.chunk import passage_spans
    from citeqa.types import Document

    badges = ("[![CI](https://ci.example/badge.svg)](https://ci.example)\n"
              "[![PyPI][pypi-badge]][pypi-link]")
    prose = "Zebraquartz reads a cluster's configuration and names the nodes that drift."
    cfg = ChunkConfig(max_chars=160)
    for head in ("# Zebraquartz", "Zebraquartz\n===========", "### Gold Sponsors", "#"):
        text = f"{head}\n\n{badges}\n\n## What it is\n\n{prose}"
        pieces = [text[s:e] for s, e in passage_spans(Document("d", "t", "README.md", text), cfg)]
        assert pieces == [f"## What it is\n\n{prose}"], (head, pieces)
    alone = f"# Zebraquartz\n\n{badges}"  # all of them so: all kept
    assert passage_spans(Document("d", "t", "a.md", alone), cfg) == chunk_document(alone, cfg)
    # what a heading's line is not: a list item over a rule, "#hashtag", words under words
    for kept in ("- Zebraquartz\n---", "#zebraquartz rocks", "Zebraquartz\nreads configs"):
        assert headings_out(kept).strip(), kept
    assert headings_out("# A\nB\n=====\nC\n---\n## D ##\n").split() == []


def _spans(text: str, max_chars: int) -> list[tuple[int, int]]:
    return chunk_document(text, ChunkConfig(max_chars=max_chars, overlap_sentences=0))


def test_a_clause_comma_in_the_windows_first_half_is_no_cut() -> None:
    """Unspaced (CJK) text with a comma near its start was cut into a 4-character passage
    instead of at the window's end."""
    assert _spans("あいう、" + "か" * 100, 40)[:2] == [(0, 40), (40, 80)]


def test_a_run_of_marks_past_the_windows_half_is_cut_at_the_windows_end() -> None:
    """A letter carrying a long run of combining marks past the window's half made the
    passage back off to 15 characters instead of filling its 40."""
    text = "x" * 15 + "e" + "\u0301" * 30 + "y" * 20
    assert _spans(text, 40)[:2] == [(0, 40), (40, 66)]


def test_a_comma_cuts_when_the_last_space_is_exactly_at_the_windows_half() -> None:
    """With the window's last space exactly at its half, the passage was cut at that space
    (10 characters) instead of after the comma in the second half (18)."""
    assert _spans("abcdefghij klmnop," + "q" * 30 + ".", 20)[:2] == [(0, 18), (18, 38)]


def test_a_paragraph_of_exactly_a_quarter_of_max_chars_is_a_passage_of_its_own() -> None:
    """A paragraph exactly max_chars // 4 long was merged into the next paragraph's passage."""
    text = "Abcdefghi.\n\nShort one. " + "Another sentence here. " * 5
    assert _spans(text, 40)[:2] == [(0, 10), (12, 45)]


def test_a_last_paragraph_of_exactly_a_quarter_of_max_chars_is_a_passage_of_its_own() -> None:
    """A rest of the text exactly max_chars // 4 long after a paragraph break was merged
    into the passage before it (only a shorter rest is)."""
    assert _spans("First sentence here.\n\nAbcdefghi.", 40) == [(0, 20), (22, 32)]


def test_an_underlined_heading_exactly_max_chars_long_stays_whole() -> None:
    """A heading with its underline exactly max_chars long was cut in two: the title in one
    passage, its "=====" alone in the next."""
    text = "Intro\n=====\n\nThe body text of it."
    assert _spans(text, 11)[0] == (0, 11)
    assert _spans("Some text.\n\nIntro\n=====\n\nThe body.", 11) == [(0, 10), (12, 23), (25, 34)]
