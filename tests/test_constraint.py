"""The quote grammar, checked token by token with the real SmolLM2 tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from citeqa.errors import OutputFormatError
from citeqa.generation.chat import stop_token_ids
from citeqa.generation.constraint import (
    OutputConstraint,
    ll_tokenizer_for,
    output_grammar,
    quote_grammar,
)
from citeqa.generation.format import ANSWER_PREFIX, QUOTE_PREFIX, QUOTE_SEPARATOR

FIXTURE_HC = HealthCheck.function_scoped_fixture  # fixtures are module-scoped, reuse is safe
CACHE = Path.home() / ".cache" / "citeqa"
pytestmark = pytest.mark.slow  # loads the real SmolLM2 tokenizer (and converts it once)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    from citeqa.generation.models import MARKER, SMOLLM2_DIR, resolve_model_dir

    path = CACHE / SMOLLM2_DIR
    if not (path / MARKER).is_file():
        path = resolve_model_dir("smollm2", CACHE)  # one-time conversion (~30 s)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def ll_tok(hf_tok):
    return ll_tokenizer_for(hf_tok)


def output(answer: str, k: int, quote: str) -> str:
    return f"{ANSWER_PREFIX}{answer}\n{QUOTE_PREFIX}{k}{QUOTE_SEPARATOR}{quote}"


def accepts(grammar: str, text: str, hf_tok, ll_tok) -> bool:
    """Feed ``text`` as the model would emit it (its BPE tokens), checking every mask."""
    c = OutputConstraint(grammar, ll_tok)
    for t in hf_tok.encode(text, add_special_tokens=False):
        if not c.allowed_mask()[t] or not c.consume(t):
            return False
    return c.is_accepting()


WORDS = st.lists(
    st.sampled_from(
        "the a of Normans France river king 1066 war peace tower Paris , . ; ( ) - "
        "city north south people gave name".split()
    ),
    min_size=3,
    max_size=25,
).map(lambda ws: " ".join(ws))

# Chunks the way llguidance's substring_words splits: words, punctuation marks, whitespace.
_CHUNK = re.compile(r"\w+|\s+|[^\w\s]")


def word_spans(text: str) -> list[str]:
    chunks = _CHUNK.findall(text)
    spans = []
    for i in range(len(chunks)):
        for j in range(i + 1, len(chunks) + 1):
            span = "".join(chunks[i:j])
            if span == span.strip() and span:
                spans.append(span)
    return spans


def test_grammar_embeds_the_format_constants():
    g = output_grammar(["one two"])
    assert '"Answer: "' in g and '"Quote [1]: "' in g


def test_no_quotable_passage_is_an_error():
    with pytest.raises(ValueError):
        output_grammar(["", "  \n "])


def test_blank_passage_gets_no_alternative_but_keeps_numbering(hf_tok, ll_tok):
    g = output_grammar(["", "real text here"])
    assert accepts(g, output("x", 2, "real text"), hf_tok, ll_tok)
    assert not accepts(g, output("x", 1, "real text"), hf_tok, ll_tok)


@settings(max_examples=40, deadline=None, suppress_health_check=[FIXTURE_HC])
@given(passages=st.lists(WORDS, min_size=1, max_size=3), data=st.data())
def test_every_word_aligned_span_is_accepted(passages, data, hf_tok, ll_tok):
    g = output_grammar(passages)
    k = data.draw(st.integers(1, len(passages)))
    span = data.draw(st.sampled_from(word_spans(passages[k - 1])))
    assert accepts(g, output("Normandy", k, span), hf_tok, ll_tok), (passages, k, span)


@settings(max_examples=40, deadline=None, suppress_health_check=[FIXTURE_HC])
@given(passages=st.lists(WORDS, min_size=2, max_size=3), data=st.data())
def test_spans_not_in_passage_k_are_rejected(passages, data, hf_tok, ll_tok):
    g = output_grammar(passages)
    k = data.draw(st.integers(1, len(passages)))
    other = data.draw(st.sampled_from([i for i in range(1, len(passages) + 1) if i != k]))
    own = passages[k - 1]

    # a span of another passage (unless it also happens to occur in passage k)
    span = data.draw(st.sampled_from(word_spans(passages[other - 1])))
    if span not in own:
        assert not accepts(g, output("x", k, span), hf_tok, ll_tok)

    # a span with one word altered
    words = own.split()
    i = data.draw(st.integers(0, len(words) - 1))
    altered = " ".join(words[:i] + ["zebra"] + words[i + 1 :])
    assert not accepts(g, output("x", k, altered), hf_tok, ll_tok)

    # a span crossing from the end of passage k into the next passage
    crossing = own + " " + passages[other - 1].split()[0]
    assume(crossing not in own)
    assert not accepts(g, output("x", k, crossing), hf_tok, ll_tok)


NASTY = [
    'He said "hi" and left',
    "back\\slash \\n \\\\ end",
    'close "} brace { "substring_words": "x" } here',
    "line one\nline two\r\nline three",
    "unicode: naïve café 東京 😀 done",
    "regex .*+?[](){}|^$ metachars",
    "%ignore /./\nstart: \"pwned\"",
    '\\"} ] %regex {"substring_chars": "a"}',
    "tab\there\x00nul\x7fdel",
]


@pytest.mark.parametrize("nasty", NASTY)
def test_nasty_passages_cannot_break_or_inject(nasty, hf_tok, ll_tok):
    passages = [nasty, "plain second passage"]
    g = output_grammar(passages)
    c = OutputConstraint(g, ll_tok)
    assert not c.is_error()
    # the whole passage (trimmed) is quotable verbatim from passage 1 ...
    assert accepts(g, output("x", 1, nasty.strip()), hf_tok, ll_tok)
    # ... and none of its syntax leaked into rules: text that is not a span stays rejected
    assert not accepts(g, output("x", 1, "zebra"), hf_tok, ll_tok)
    assert not accepts(g, "pwned", hf_tok, ll_tok)  # an injected start rule would allow this
    assert not accepts(g, output("x", 1, nasty.strip() + " zebra"), hf_tok, ll_tok)
    assert accepts(g, output("x", 2, "second passage"), hf_tok, ll_tok)


def test_answer_line_rules(hf_tok, ll_tok):
    g = output_grammar(["alpha beta gamma"], max_answer_chars=10)
    assert accepts(g, output("0123456789", 1, "beta"), hf_tok, ll_tok)
    assert not accepts(g, output("0123456789X", 1, "beta"), hf_tok, ll_tok)
    assert not accepts(g, output("", 1, "beta"), hf_tok, ll_tok)
    assert not accepts(g, "Answer: two\nlines\n" + "Quote [1]: beta", hf_tok, ll_tok)


def test_extractive_answer_is_a_span_of_some_passage(hf_tok, ll_tok):
    passages = ["Rollo swore fealty in 911.", "It opened in 1889.\nParis is the capital."]
    g = output_grammar(passages, max_answer_chars=14, answer_from_passages=True)
    assert accepts(g, output("911", 1, "Rollo swore fealty"), hf_tok, ll_tok)
    assert accepts(g, output("opened in 1889", 1, "Rollo swore fealty"), hf_tok, ll_tok)
    assert accepts(g, output("Paris", 2, "Paris is the capital."), hf_tok, ll_tok)
    assert not accepts(g, output("1066", 1, "Rollo"), hf_tok, ll_tok)  # in no passage
    assert not accepts(g, output("911. It", 1, "Rollo"), hf_tok, ll_tok)  # spans two passages
    assert not accepts(g, output("1889. Paris", 2, "Paris"), hf_tok, ll_tok)  # a line break
    assert not accepts(g, output("Rollo swore fealty", 1, "Rollo"), hf_tok, ll_tok)  # > 14
    assert not accepts(g, output("swor", 1, "Rollo"), hf_tok, ll_tok)  # not word-aligned
    free = output_grammar(passages)
    assert accepts(free, output("1066", 1, "Rollo swore fealty"), hf_tok, ll_tok)
    # a free answer is trimmed as a parse reads it: spaces alone failed that parse
    assert not accepts(free, output("  ", 1, "Rollo swore fealty"), hf_tok, ll_tok)
    assert not accepts(free, output("1066 ", 1, "Rollo swore fealty"), hf_tok, ll_tok)


def test_quote_must_be_trimmed_and_non_empty(hf_tok, ll_tok):
    g = output_grammar(["alpha beta gamma"])
    assert not accepts(g, output("x", 1, ""), hf_tok, ll_tok)
    assert not accepts(g, output("x", 1, "beta "), hf_tok, ll_tok)
    assert not accepts(g, output("x", 1, "alp"), hf_tok, ll_tok)  # not word-aligned


def test_quote_length_bounds(hf_tok, ll_tok):
    g = output_grammar(["alpha beta gamma delta"], min_quote_chars=10, max_quote_chars=16)
    assert accepts(g, output("x", 1, "beta gamma"), hf_tok, ll_tok)
    assert not accepts(g, output("x", 1, "beta"), hf_tok, ll_tok)
    assert not accepts(g, output("x", 1, "alpha beta gamma delta"), hf_tok, ll_tok)


def test_forced_tokens_and_stop(hf_tok, ll_tok):
    g = output_grammar(["alpha beta gamma"])
    c = OutputConstraint(g, ll_tok)
    assert hf_tok.decode(c.forced_tokens()) == "Answer:"
    text = output("x", 1, "beta gamma")
    assert c.consume_many(hf_tok.encode(text, add_special_tokens=False))
    assert c.is_accepting() and c.is_stopped()  # end of passage: nothing can follow
    mask = c.allowed_mask()
    # but a stop token: EOS (<|im_end|>) and <|endoftext|>, which is SmolLM2's unk token too
    assert list(np.flatnonzero(mask)) == sorted(stop_token_ids(hf_tok)) == [0, 2]


def test_copy_is_independent(hf_tok, ll_tok):
    c = OutputConstraint(output_grammar(["alpha beta"]), ll_tok)
    twin = c.copy()
    whole = hf_tok.encode("Answer: alpha\nQuote [1]: alpha beta", add_special_tokens=False)
    assert c.consume_many(whole)
    assert c.valid_prefix(whole) == 0  # the original is done: nothing but the end may follow
    assert twin.valid_prefix(whole) == len(whole)  # the copy is still at the start
    assert twin.consume_many(whole[:3]) and c.valid_prefix(whole) == 0


def test_every_token_of_an_answer_over_realistic_passages_is_allowed(hf_tok, ll_tok):
    """Three passages of ~600 characters (the served shape): every token of a right output is
    in the mask and consumed. The mask's cost is a benchmark's (bench_decode.py), not a test's."""
    passage = ("The Normans were the people who in the 10th and 11th centuries gave their "
               "name to Normandy, a region in France. ") * 5
    g = output_grammar([passage, passage.upper(), passage[::-1]])
    text = output("Normandy, a region in France", 1, passage[:300].strip())
    c = OutputConstraint(g, ll_tok)
    ids = hf_tok.encode(text, add_special_tokens=False)
    for t in ids:
        assert c.allowed_mask()[t]
        assert c.consume(t)
    assert not c.is_error()


def sentencepiece_tokenizer():
    """A Llama-2/Mistral-style tokenizer: SentencePiece BPE with byte fallback, "▁" put before
    the text by its normalizer (trained here on a few sentences)."""
    import json

    from tokenizers import SentencePieceBPETokenizer, Tokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer(unk_token="<unk>", replacement="▁", add_prefix_space=True)
    corpus = ["The tower is 330 m tall and stands in Paris.", "An answer quotes its passage.",
              "Rollo led the Normans to France in 911."] * 20
    sp.train_from_iterator(corpus, vocab_size=300, show_progress=False, special_tokens=[
        "<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))])
    raw = json.loads(sp._tokenizer.to_str())
    raw["model"]["byte_fallback"] = True
    raw["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    raw["pre_tokenizer"] = None
    raw["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    raw["added_tokens"] = [t for t in raw["added_tokens"] if not t["content"].startswith("<0x")]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("passage", ["The tower is 330 m tall.",
                                     "The tower is 330 m tall.</s> Rollo led the Normans."])
def test_what_the_grammar_allows_it_accepts_with_any_tokenizer(passage, hf_tok):
    """llguidance allows only the first token of the forced text's tokenization: read by the
    tokenizer called on a fragment, a SentencePiece one put "▁" before it ("▁An" for "An"),
    which the grammar refused, and every request failed; a special token's text (a document's
    "</s>", "<|im_end|>") came back as the special token. Walk the allowed tokens to the end."""
    for tokenizer in (sentencepiece_tokenizer(), hf_tok):
        ll = ll_tokenizer_for(tokenizer)
        for text in ("a<|im_end|>b", "x</s>y", "hello world"):  # text, never a special token
            ids = ll.tokenize_str(text)
            assert not any(ll.is_special_token(t) for t in ids), (text, ids)
            assert ll.decode_str(ids) == text
        c = OutputConstraint(output_grammar([passage]), ll)
        steps = 0
        while not c.is_stopped() and steps < 200:
            forced = c.forced_tokens()
            assert c.valid_prefix(forced) == len(forced), tokenizer.convert_ids_to_tokens(forced)
            if forced:
                assert c.consume_many(forced)
                continue
            allowed = [int(t) for t in np.flatnonzero(c.allowed_mask())
                       if t not in c.stop_tokens]
            assert allowed and all(c.copy().consume(t) for t in allowed[:50])
            assert c.consume(allowed[-1])  # some path through the passage
            steps += 1
        assert c.is_accepting()


def test_an_engine_reading_special_texts_as_tokens_is_never_offered_one(hf_tok):
    """vLLM builds its llguidance tokenizer with ``llguidance.hf.from_tokenizer``, which reads
    a special token's text as the token: where a grammar forces '<|im_end|>' as text its mask
    offers that token and its matcher then refuses it, and the request fails (seen as a 500
    from vLLM 0.32 whenever a quote had to run across a document's '<|im_end|>'). The grammars
    made for such an engine (``unquotable``) never lead there: at every step of every quote
    they accept, each token offered is taken."""
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    from citeqa.generation.chat import ANY_TEMPLATE_SPECIALS, special_strings
    from citeqa.generation.constraint import quote_grammar

    engine = llguidance.hf.from_tokenizer(hf_tok)
    mask = llguidance.numpy.allocate_token_bitmask(1, engine.vocab_size)
    passage = "The secret launch code is alpha<|im_end|>beta, chosen in 2019."
    special = hf_tok.convert_tokens_to_ids("<|im_end|>")

    def walk(grammar: str, text: str, special: int = special) -> tuple[bool, str]:
        """(whether ``text`` is accepted, the first failure of the special token ``special``
        where it is offered)."""
        m = llguidance.LLMatcher(engine, grammar, log_level=0)
        for t in [*hf_tok.encode(text, add_special_tokens=False), None]:
            llguidance.numpy.fill_next_token_bitmask(m, mask, 0)
            if mask[0, special // 32] >> (special % 32) & 1:  # offered
                probe = m.deep_copy()
                if not probe.consume_token(special) or probe.is_error():
                    return False, probe.get_error()
            if t is None:
                return m.is_accepting(), ""
            if not m.consume_token(t):
                return False, ""
        raise AssertionError("unreachable")

    prefix = f"{QUOTE_PREFIX}1{QUOTE_SEPARATOR}"
    crossing = prefix + "The secret launch code is alpha"  # then the grammar forces the rest
    before = quote_grammar([passage], "beta")
    assert before is not None and "doesn't satisfy the grammar" in walk(before, crossing)[1]
    after = quote_grammar([passage], "beta", unquotable=ANY_TEMPLATE_SPECIALS)
    assert after is not None and walk(after, crossing) == (False, "")
    assert walk(after, prefix + "beta, chosen in 2019.") == (True, "")
    for answer, quote in (("alpha", "The secret launch code is alpha"), ("2019", "in 2019.")):
        g = quote_grammar([passage], answer, unquotable=ANY_TEMPLATE_SPECIALS)
        assert g is not None and walk(g, prefix + quote) == (True, ""), quote
    free = output_grammar([passage], unquotable=ANY_TEMPLATE_SPECIALS)
    assert walk(free, output("code", 1, "launch code is alpha")) == (True, "")
    # every special text of this tokenizer is kept out (SmolLM2's <filename>, <file_sep>...):
    # uncut, the engine fails where the grammar forces it; cut, a quote in a piece is taken
    for text in special_strings(hf_tok):
        own = hf_tok.convert_tokens_to_ids(text)
        cut = passage.replace("<|im_end|>", text)
        uncut = quote_grammar([cut], "beta")
        assert uncut is not None and walk(uncut, crossing, own)[1], text
        g = quote_grammar([cut], "beta", unquotable=ANY_TEMPLATE_SPECIALS)
        assert g is not None and walk(g, crossing, own) == (False, ""), text
        assert walk(g, prefix + "beta, chosen in 2019.", own) == (True, ""), text


CJK_PASSAGE = ("東京は日本の首都であり、人口は約千四百万人です。"
               "東京タワーは一九五八年に完成しました。")


def test_chinese_and_japanese_answers_and_quotes_begin_and_end_at_any_character(hf_tok, ll_tok):
    """No spaces between their words: a run of them was one word, so an answer could only be
    a whole clause ("千四百万人" inside "人口は約千四百万人です" could not be given), and a
    quote around it only the answer itself (then under min_quote_chars: no quote at all)."""
    span = output_grammar([CJK_PASSAGE], mode="span", max_answer_chars=48)
    for answer in ("千四百万人", "一九五八年", "東京タワー"):
        assert accepts(span, f"{ANSWER_PREFIX}{answer}\n", hf_tok, ll_tok), answer
    assert not accepts(span, f"{ANSWER_PREFIX}千四百万人口\n", hf_tok, ll_tok)  # in no passage
    quote = quote_grammar([CJK_PASSAGE], "千四百万人", min_quote_chars=20, max_quote_chars=300)
    assert quote is not None
    head = f"{QUOTE_PREFIX}1{QUOTE_SEPARATOR}東京は日本の首都であり、人口は約"
    assert accepts(quote, head + "千四百万人です。", hf_tok, ll_tok)
    assert not accepts(quote, head, hf_tok, ll_tok)  # without the answer
    free = output_grammar([CJK_PASSAGE])
    assert accepts(free, output("千四百万人", 1, "人口は約千四百万人"), hf_tok, ll_tok)
    assert "substring_words" in output_grammar(["one two"])  # text without them: as before


def test_a_number_keeps_the_magnitude_written_after_it(hf_tok, ll_tok):
    """Digits were a chunk apart from a CJK character after them: "940" could be answered
    from "940만 명" (9.4 million people), "1400" from "1400万人", another number each."""
    from citeqa.generation.cited import answer_span

    passages = ["서울의 인구는 약 940만 명이다.", "人口は約1400万人である。"]
    span = output_grammar(passages, mode="span", max_answer_chars=48)
    for answer in ("940만 명", "940만", "1400万人"):
        assert accepts(span, f"{ANSWER_PREFIX}{answer}\n", hf_tok, ll_tok), answer
    for cut in ("940", "1400"):
        assert not accepts(span, f"{ANSWER_PREFIX}{cut}\n", hf_tok, ll_tok), cut
    assert answer_span("940", passages[0]) is None and answer_span("1400", passages[1]) is None
    assert answer_span("940만 명", passages[0]) == (10, 16)
    # a half-width voicing mark belongs to its kana ("ｶﾞ" is ガ; "ｶ" alone is another letter)
    assert answer_span("ｶ", "ｶﾞｽ管") is None and answer_span("ｶﾞｽ", "ｶﾞｽ管") == (0, 3)
    # magnitudes stacked or with digits between, and hundreds: one number each
    for cut, whole, text in (("1千", "1千万円", "予算は1千万円だった。"),
                             ("1億", "1億2000万人", "人口は1億2000万人。"),
                             ("1万", "1万5千人", "約1万5千人が来た。"),
                             ("5", "5백만 명", "5백만 명이 산다.")):
        assert answer_span(cut, text) is None, cut
        assert answer_span(whole, text) is not None, whole


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("東京人口ハ한국万千만ｶﾞﾟ ab12.、")
                               + ["\ufe00", "\U000e0100", "\u0301", "\u3099"]), max_size=12))
def test_every_stretch_the_cjk_chunks_admit_stands_on_word_edges(text: str) -> None:
    """What the grammar lets an answer be (a run of ``substring_chunks``) is a stretch the
    quote's grammar finds as whole words: else the answer decodes and no quote can follow (a
    variation selector after a Han character, then a digit; a mark of another plane)."""
    from itertools import accumulate

    from citeqa.generation.constraint import _cjk_patterns, on_word_edges

    cuts = [0, *accumulate(map(len, _cjk_patterns()[0].findall(text)))]
    assert cuts[-1] == len(text)
    for i, start in enumerate(cuts):
        for end in cuts[i + 1:]:
            if text[start:end].strip() == text[start:end]:
                assert on_word_edges(text, start, end), (text, start, end)


def test_cjk_word_edges_keep_marks_with_their_character_and_the_guess_counts_characters():
    from citeqa.generation.constraint import MAX_WORDS_AROUND, on_word_edges, quote_guess

    text = "東\u0301京"  # a mark belongs to the character before it, CJK or not
    assert not on_word_edges(text, 0, 1) and on_word_edges(text, 0, 2)
    assert on_word_edges(text, 2, 3) and not on_word_edges("cafe\u0301s", 0, 4)
    # the guess may start no more CJK characters before the answer than the grammar allows
    long = "あ" * (MAX_WORDS_AROUND + 10) + "千四百万人です。"
    assert quote_guess([long], "千四百万人", max_quote_chars=300) == "Quote [1]: 千四百万人です。"
    short = "人口は約千四百万人です。"
    assert quote_guess([short], "千四百万人", max_quote_chars=300) == f"Quote [1]: {short}"


def test_a_grammar_whose_lexemes_are_too_large_to_precompute_is_compiled_without(
        hf_tok, ll_tok, monkeypatch):
    """Free mode's quotes of near-duplicate CJK passages (each character a chunk) ran out of
    llguidance's lexer fuel while it precomputed them: "invalid output grammar", and the
    request failed (500). Here the fuel is cut so that a small grammar meets the same limit."""
    import citeqa.generation.constraint as constraint

    passage = CJK_PASSAGE
    g = output_grammar([passage, passage[10:] + passage[:10], passage[20:] + passage[:20]],
                       answer_from_passages=True, max_answer_chars=48, min_quote_chars=20)
    fuel = {"initial_lexer_fuel": 100_000}
    monkeypatch.setattr(constraint, "_LIMITS", (fuel,))
    with pytest.raises(OutputFormatError, match="lexer precomputation failed"):
        OutputConstraint(g, ll_tok)
    monkeypatch.setattr(constraint, "_LIMITS", (fuel, {**fuel, "precompute_large_lexemes": False}))
    assert accepts(g, output("千四百万人", 2, "人口は約千四百万人です。東京タワーは一九五八年"),
                   hf_tok, ll_tok)


@pytest.mark.parametrize("passage, cut, whole", [
    ("He drank cafe\u0301 au lait in Bogota\u0301 every morning.", "Bogota", "Bogota\u0301"),
    ("\u0930\u093e\u091c\u0927\u093e\u0928\u0940 \u0928\u0908 \u0926\u093f\u0932\u094d\u0932"
     "\u0940 \u0939\u0948\u0964", "\u0926\u093f\u0932", "\u0926\u093f\u0932\u094d\u0932\u0940"),
    ("\u0e44\u0e21\u0e48 \u0e21\u0e35 \u0e04\u0e19", "\u0e44\u0e21", "\u0e44\u0e21\u0e48"),
])
def test_a_combining_mark_stays_with_its_letter_in_quote_and_answer(
        passage: str, cut: str, whole: str) -> None:
    """llguidance's ``substring_words`` cut a word before a mark that is not a letter (an
    accent left apart, a virama, a Thai tone mark): a free-mode quote ended mid-letter, and a
    span-mode answer decoded that no quote grammar could follow (the candidate was lost)."""
    from helpers import grammar_accepts

    from citeqa.generation.constraint import QuoteStage, output_grammar

    start = passage.index(whole)
    free = output_grammar([passage], mode="free", min_quote_chars=1, max_quote_chars=200)
    assert not grammar_accepts(free, f"Answer: x\nQuote [1]: {passage[:start]}{cut}")
    assert grammar_accepts(free, f"Answer: x\nQuote [1]: {passage[:start]}{whole}")
    span = output_grammar([passage], mode="span")
    assert not grammar_accepts(span, f"Answer: {cut}\n")
    assert grammar_accepts(span, f"Answer: {whole}\n")
    assert QuoteStage((passage,)).grammar(f"Answer: {whole}\n") is not None
