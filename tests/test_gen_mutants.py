"""Mutation-testing round on the generator's prompt, cited generator, chat template, drafts,
remote engine client and backend seam: boundaries and branches the other tests left open (no
model: fake tokenizers, ``FakeBackend`` and ``httpx.MockTransport``)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from helpers import request_accepts

from citeqa.config import GenerationConfig
from citeqa.errors import EngineError, EngineUnavailableError, ModelError
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.chat import (
    WORD_JOINER,
    defused,
    defused_for_any_template,
    end_token_id,
    prompt_ids,
    special_strings,
    stop_token_ids,
    system_in_user,
    turn_ids,
)
from citeqa.generation.cited import CitedGenerator
from citeqa.generation.fake import FakeBackend
from citeqa.generation.prompt import build_messages, parse_user_message
from citeqa.generation.remote import RemoteBackend
from citeqa.retry import Backoff
from citeqa.types import Document, Hit, Passage

# --- chat: a fake tokenizer (one id per character; a few named tokens) ---------------------------


class Tok:
    """A tokenizer's surface as chat.py reads it, with no vocabulary behind it."""

    unk_token_id = 0
    unk_token: str | None = None

    def __init__(self, *, eos: int | None = 1, vocab: dict[str, int] | None = None,
                 specials: tuple[str, ...] = (), added: dict[int, Any] | None = None,
                 template: str | None = None, refuse: bool = False) -> None:
        self.eos_token_id = eos
        self.vocab = vocab or {}
        self.all_special_tokens = list(specials)
        self.added_tokens_decoder = added or {}
        self.chat_template = template
        self.refuse = refuse  # apply_chat_template raises jinja's TemplateError
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, self.unk_token_id)

    def convert_ids_to_tokens(self, tid: int) -> str | None:
        return {i: t for t, i in self.vocab.items()}.get(tid, self.unk_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
        self.calls.append((list(messages), kw))
        if self.refuse:
            from jinja2 import TemplateError

            raise TemplateError("no chat here")
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return {"input_ids": [ord(c) for c in text]}


SYS = {"role": "system", "content": "S"}
USER = {"role": "user", "content": "U"}


def test_a_one_character_special_token_is_not_broken_in_the_messages() -> None:
    tok = Tok(specials=("<|im_end|>", "x"))
    assert special_strings(tok) == ("<|im_end|>",)
    [m] = defused(tok, [{"role": "user", "content": "box <|im_end|>"}])
    assert m["content"] == f"box <{WORD_JOINER}|im_end|>"


def test_an_added_token_that_does_not_say_it_is_special_is_not_one() -> None:
    tok = Tok(added={7: SimpleNamespace(content="<tool>"),
                     8: SimpleNamespace(content="<sep>", special=True)})
    assert special_strings(tok) == ("<sep>",)


def test_the_system_turn_goes_into_a_user_turn_only() -> None:
    assistant = {"role": "assistant", "content": "A"}
    assert system_in_user([SYS, assistant]) == [SYS, assistant]
    assert system_in_user([SYS, USER, assistant]) == [
        {"role": "user", "content": "S\n\nU"}, assistant]


def test_a_template_refusing_a_prompt_without_a_system_turn_says_so_at_once() -> None:
    tok = Tok(template="t", refuse=True)
    with pytest.raises(ModelError, match="refuses citeqa's prompt: no chat here"):
        prompt_ids(tok, [USER])
    assert len(tok.calls) == 1  # nothing to merge: not asked again


def test_a_base_model_gets_its_turns_as_paragraphs_ending_in_a_blank_line() -> None:
    assert "".join(map(chr, prompt_ids(Tok(), [SYS, USER]))) == "S\n\nU\n\n"


def test_a_lone_turn_is_rendered_without_the_assistants_opening() -> None:
    tok = Tok(template="t")
    assert "".join(map(chr, turn_ids(tok, SYS) or [])) == "[system]S"
    assert tok.calls[-1][1]["add_generation_prompt"] is False
    prompt_ids(tok, [SYS, USER])
    assert tok.calls[-1][1]["add_generation_prompt"] is True


def test_an_end_token_the_vocabulary_lacks_is_no_stop() -> None:
    tok = Tok(eos=5, vocab={"<|im_end|>": 5})  # "<|endoftext|>" converts to the unknown token
    assert stop_token_ids(tok) == [5]


def test_an_end_token_that_is_also_the_unknown_token_is_a_stop() -> None:
    """SmolLM2's tokenizer: eos <|im_end|> (2), and <|endoftext|> (0) is its unk_token too.
    _token_id took a token whose id is the unknown token's for a missing one: no stop."""
    tok = Tok(eos=2, vocab={"<|im_end|>": 2, "<|endoftext|>": 0})
    tok.unk_token = "<|endoftext|>"
    assert stop_token_ids(tok) == [2, 0]


def test_the_stop_tokens_name_each_token_once() -> None:
    assert stop_token_ids(Tok(eos=9, vocab={"<|im_end|>": 9, "<|endoftext|>": 4})) == [9, 4]


def test_an_eos_of_id_zero_is_a_stop() -> None:
    tok = Tok(eos=0, vocab={"<|im_end|>": 3})
    tok.unk_token_id = 99
    assert stop_token_ids(tok) == [0, 3]


def test_a_trained_reply_ends_with_the_turns_end_else_eos() -> None:
    assert end_token_id(Tok(eos=1, vocab={"<|im_end|>": 2, "<|endoftext|>": 3})) == 2
    assert end_token_id(Tok(eos=1, vocab={"<|endoftext|>": 3})) == 1


def test_a_pipe_token_of_one_character_is_broken_for_an_engines_template() -> None:
    [m] = defused_for_any_template([{"role": "user", "content": "a <|x|> b"}])
    assert m["content"] == f"a <{WORD_JOINER}|x|> b"


def test_a_word_in_angle_brackets_is_broken_for_an_engines_template() -> None:
    """SmolLM2's "<filename>" and Qwen3's "</think>" are special tokens there: a passage's
    reached a remote engine whole (its grammars kept them out of quotes, its prompt did not)."""
    [m] = defused_for_any_template([{"role": "user",
                                     "content": "a <filename> b </think> 1 < 2 > 0 <|x|>"}])
    assert m["content"] == (f"a <{WORD_JOINER}filename> b <{WORD_JOINER}/think> 1 < 2 > 0 "
                            f"<{WORD_JOINER}|x|>")


# --- prompt --------------------------------------------------------------------------------------


def test_the_question_is_read_back_after_a_passage_that_holds_a_question_line() -> None:
    text = "Intro here.\nQuestion: what the document asks?"
    hit = Hit(Passage(0, "d", 0, len(text), text), "T", "t", 1.0)
    messages, _ = build_messages("Who wrote it?", [hit], GenerationConfig())
    passages, question = parse_user_message(messages[1]["content"])
    assert question == "Who wrote it?"
    assert passages == [(1, text)]


# --- remote: the payload, the server's messages, the model list ---------------------------------

MSGS = ({"role": "user", "content": "q?"},)
NO_RETRY = Backoff(retries=0, base_s=0.01, max_s=0.01)


def engine(handler: Any) -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return httpx.Client(transport=httpx.MockTransport(wrapped)), seen


def answer(text: str, lps: list[float], finish: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={"choices": [{
        "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
        "logprobs": {"content": [{"token": "t", "logprob": lp} for lp in lps]}}]})


def test_a_seed_of_zero_is_sent() -> None:
    b = RemoteBackend("http://gen", "m", client=engine(lambda r: answer("x", []))[0])
    assert b.payload(GenerationRequest(messages=MSGS, seed=0))["seed"] == 0
    assert "seed" not in b.payload(GenerationRequest(messages=MSGS))


@pytest.mark.parametrize("body, said", [
    ({"message": "top-level boom"}, "418: top-level boom"),
    ({"error": "plain boom"}, "418: plain boom"),
])
def test_an_engines_error_message_is_given_as_it_said_it(body: dict, said: str) -> None:
    client, _ = engine(lambda r: httpx.Response(418, json=body))
    with pytest.raises(EngineError) as info:
        RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY).generate(
            [GenerationRequest(messages=MSGS)])
    assert str(info.value).endswith(said)


def test_an_error_with_an_empty_body_says_its_reason_phrase() -> None:
    client, _ = engine(lambda r: httpx.Response(418))
    with pytest.raises(EngineError, match=r"418: I'm a teapot$"):
        RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY).generate(
            [GenerationRequest(messages=MSGS)])


def test_a_root_that_is_the_served_name_is_not_repeated_in_the_model_id() -> None:
    models = {"data": [{"id": "smol", "root": "smol"}]}
    client, _ = engine(lambda r: httpx.Response(200, json=models))
    b = RemoteBackend("http://gen", client=client)
    b.wait_ready(timeout_s=1)
    assert b.model_id == "remote:smol"


@pytest.mark.parametrize("body, match", [
    ({"data": [{"id": ""}]}, "unexpected /v1/models response"),
    ({"data": []}, "serves no model"),
])
def test_a_model_list_of_no_usable_name_is_an_engine_error(body: dict, match: str) -> None:
    client, _ = engine(lambda r: httpx.Response(200, json=body))
    with pytest.raises(EngineError, match=match):
        RemoteBackend("http://gen", client=client).wait_ready(timeout_s=1)


def test_the_generator_fingerprint_is_of_the_prompt_its_settings_build() -> None:
    from citeqa.generation.prompt import generator_fingerprint, prompt_fingerprint

    one = GenerationConfig(top_k_passages=1)  # the probe shows one passage, not two
    assert prompt_fingerprint(one) != prompt_fingerprint()
    assert generator_fingerprint("m", one)["prompt_sha256"] == prompt_fingerprint(one)[:16]


# --- cited: budgets, plans, candidates -----------------------------------------------------------

NORMANS = ("The Normans gave their name to Normandy, a region in France. "
           "Their leader Rollo swore fealty to King Charles III of West Francia.")
DOCS = {"n": Document("n", "Normans", "n.txt", NORMANS)}
HITS = [Hit(Passage(0, "n", 0, len(NORMANS), NORMANS), "Normans", "n.txt", 0.9)]
QUOTE = "\nQuote [1]: Their leader Rollo swore fealty"


def requests_for(cfg: GenerationConfig, texts: list[str] | None = None, **kw: Any,
                 ) -> tuple[Any, FakeBackend]:
    backend = FakeBackend(lambda r: (texts or ["Answer: Rollo" + QUOTE]) * r.n)
    out = CitedGenerator(backend, cfg).generate("Who was the leader?", HITS, DOCS.__getitem__,
                                                **kw)
    return out, backend


def test_a_free_answer_may_be_four_characters_a_token_long() -> None:
    cfg = GenerationConfig(answer_mode="free", extractive_answer=False, max_answer_tokens=3)
    _, backend = requests_for(cfg)
    [req] = backend.requests
    assert request_accepts(req, "Answer: " + "a" * 12 + QUOTE)
    assert not request_accepts(req, "Answer: " + "a" * 13 + QUOTE)


def test_a_single_candidate_is_greedy_and_the_rest_beyond_the_passages_are_samples() -> None:
    cfg = GenerationConfig(answer_mode="free", temperature=0.7)
    _, backend = requests_for(cfg, n=1)
    assert [(r.n, r.temperature) for r in backend.requests] == [(1, 0.0)]
    _, backend = requests_for(cfg, n=3)
    assert [(r.n, r.temperature) for r in backend.requests] == [(1, 0.0), (2, 0.7)]
    _, backend = requests_for(cfg, n=3, constrain=False)
    assert [(r.n, r.temperature) for r in backend.requests] == [(3, 0.7)]


def test_as_many_candidates_as_passages_are_all_greedy_one_per_passage() -> None:
    two = [*HITS, Hit(Passage(1, "n", 0, len(NORMANS), NORMANS), "Normans", "n.txt", 0.5)]
    backend = FakeBackend(lambda r: ["Answer: Rollo" + QUOTE] * r.n)
    CitedGenerator(backend, GenerationConfig(answer_mode="free")).generate(
        "Who?", two, DOCS.__getitem__, n=2)
    assert [(r.n, r.temperature) for r in backend.requests] == [(1, 0.0), (1, 0.0)]
    assert ["quote: quote_1\n" in r.grammar for r in backend.requests] == [True, False]


def test_the_token_budget_of_an_english_reply() -> None:
    """12 answer tokens, 200 quote characters at 3 a token, 16 for the format: 94."""
    _, backend = requests_for(GenerationConfig(answer_mode="free"))
    assert [r.max_tokens for r in backend.requests] == [12 + 200 // 3 + 16]


def test_budget_scale_without_a_window_is_over_the_whole_text() -> None:
    from citeqa.generation.cited import budget_scale

    assert budget_scale(["ab12"]) == pytest.approx(2.0)  # (1 + 1 + 3 + 3) / 4
    assert budget_scale(["12"], 100) == pytest.approx(3.0)  # a window past the text: the text


def test_the_batch_items_timing_counts_questions_not_requests() -> None:
    from citeqa.generation.cited import GenerationItem

    backend = FakeBackend(lambda r: ["Answer: Rollo" + QUOTE] * r.n)
    items = [GenerationItem("Who?", HITS, DOCS.__getitem__, n=3)] * 2
    outs = CitedGenerator(backend, GenerationConfig(answer_mode="free")).generate_many(items)
    assert len(backend.requests) == 4
    assert [o.timings_ms["batch_items"] for o in outs] == [2.0, 2.0]


def test_an_abandoned_question_reaches_the_backend_as_abandoned() -> None:
    from citeqa.generation.cited import GenerationItem

    backend = FakeBackend(lambda r: ["Answer: Rollo" + QUOTE] * r.n)
    item = GenerationItem("Who?", HITS, DOCS.__getitem__, n=2, abandoned=lambda: True)
    [out] = CitedGenerator(backend, GenerationConfig(answer_mode="free")).generate_many([item])
    assert [c.answer for c in out.candidates] == ["", ""]
    assert all(r.is_abandoned() for r in backend.requests)


def test_a_questions_own_span_mode_holds_its_answer_to_its_quote() -> None:
    from citeqa.generation.cited import GenerationItem

    backend = FakeBackend(lambda r: ["Answer: Paris" + QUOTE] * r.n)  # an engine off its grammar
    gen = CitedGenerator(backend, GenerationConfig(answer_mode="free"))
    [span, free] = gen.generate_many([GenerationItem("Who?", HITS, DOCS.__getitem__, 1, "span"),
                                      GenerationItem("Who?", HITS, DOCS.__getitem__, 1)])
    assert span.candidates[0].quote is None
    assert free.candidates[0].quote is not None


def test_a_candidates_answer_offsets_are_in_its_document() -> None:
    at = 1000
    text = "x" * at + NORMANS
    docs = {"n": Document("n", "Normans", "n.txt", text)}
    hits = [Hit(Passage(0, "n", at, len(text), NORMANS), "Normans", "n.txt", 0.9)]
    backend = FakeBackend(lambda r: ["Answer: Rollo" + QUOTE] * r.n)
    out = CitedGenerator(backend, GenerationConfig()).generate("Who?", hits, docs.__getitem__)
    [c] = out.candidates
    assert c.quote is not None and c.answer_start is not None
    assert text[c.answer_start:c.answer_end] == "Rollo"


def test_a_model_list_of_entries_that_are_no_objects_is_an_engine_error() -> None:
    """served_models skipped entries that are no objects, then read m.get("root") of each:
    an AttributeError, and a traceback at the service's start."""
    client, _ = engine(lambda r: httpx.Response(200, json={"data": [1]}))
    with pytest.raises(EngineError):
        RemoteBackend("http://gen", client=client).wait_ready(timeout_s=1)


def test_a_blank_answer_has_no_span_even_over_the_quotes_own_blanks() -> None:
    from citeqa.generation.cited import answer_span

    assert answer_span("  ", "Rollo  swore") is None
    assert answer_span("\n", "Rollo\nswore") is None


def test_a_model_list_that_is_no_list_is_an_engine_error() -> None:
    client, _ = engine(lambda r: httpx.Response(200, json={"data": "smol"}))
    with pytest.raises(EngineError, match="unexpected /v1/models response"):
        RemoteBackend("http://gen", client=client).wait_ready(timeout_s=1)


def test_a_concurrency_below_one_is_one() -> None:
    b = RemoteBackend("http://gen", "m", concurrency=0, client=engine(lambda r: answer("x", []))[0])
    assert b.concurrency == 1
    assert [c[0].text for c in b.generate([GenerationRequest(messages=MSGS)] * 2)] == ["x", "x"]


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_error_is_unavailable_and_so_is_a_500_with_health_behind_one(status: int) -> None:
    client, _ = engine(lambda r: httpx.Response(status, text="bad gateway"))
    with pytest.raises(EngineUnavailableError, match="behind its gateway"):
        RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY).generate(
            [GenerationRequest(messages=MSGS)])
    client, _ = engine(lambda r: httpx.Response(status) if r.url.path == "/health"
                       else httpx.Response(500, text="engine died"))
    with pytest.raises(EngineUnavailableError, match="stopped while answering"):
        RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY).generate(
            [GenerationRequest(messages=MSGS)])


@pytest.mark.parametrize("health, gone", [
    (httpx.Response(503), True), (httpx.Response(502), True), (httpx.Response(200), False),
    (httpx.ConnectError("refused"), True), (httpx.ReadTimeout("slow"), False),
])
def test_an_engine_is_gone_when_its_health_refuses_or_says_so(health: Any, gone: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(health, Exception):
            raise health
        return health

    b = RemoteBackend("http://gen", "m", client=engine(handler)[0])
    assert b._engine_gone() is gone


def test_a_connection_broken_off_is_told_apart_from_one_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    client, _ = engine(handler)
    with pytest.raises(EngineUnavailableError, match="broke off its answer"):
        RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY).generate(
            [GenerationRequest(messages=MSGS)])


def span_engine(quote_finish: str = "stop") -> tuple[httpx.Client, list[httpx.Request]]:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if not body.get("continue_final_message"):
            return answer("Answer: Rollo\n", [-0.5] * 5)
        return answer("Quote [1]: Rollo led the Normans.", [-0.25], quote_finish)

    return engine(handler)


def span_request(max_tokens: int) -> GenerationRequest:
    from citeqa.generation.constraint import QuoteStage

    stage = QuoteStage(("Rollo led the Normans.",), 5, 100)
    return GenerationRequest(messages=MSGS, grammar="start: q", max_tokens=max_tokens,
                             quote_stage=stage)


def test_a_quote_call_gets_at_least_eight_tokens() -> None:
    client, seen = span_engine()
    [[c]] = RemoteBackend("http://gen", "m", client=client).generate([span_request(10)])
    assert c.text == "Answer: Rollo\nQuote [1]: Rollo led the Normans."
    assert json.loads(seen[-1].content)["max_tokens"] == 8  # 10 - 5 would leave 5


def test_a_quote_cut_by_max_tokens_is_a_failed_candidate() -> None:
    client, _ = span_engine("length")
    [[c]] = RemoteBackend("http://gen", "m", client=client).generate([span_request(40)])
    assert c.text == "" and c.timings_ms["cut"] == 1.0


# --- backend seam ---------------------------------------------------------------------------------


def test_a_request_abandoned_before_it_started_gets_n_failed_completions() -> None:
    from citeqa.generation.backend import abandoned_completions

    req = GenerationRequest(messages=MSGS, n=3, abandoned=lambda: True)
    assert [(c.text, c.n_tokens) for c in abandoned_completions(req)] == [("", 0)] * 3
    assert req.is_abandoned()
    assert not GenerationRequest(messages=MSGS, abandoned=lambda: False).is_abandoned()


def test_a_backends_unquotable_counts_only_as_a_regex() -> None:
    from citeqa.generation.backend import unquotable

    assert unquotable(SimpleNamespace(unquotable=True)) is None
    assert unquotable(SimpleNamespace(unquotable="<x>")) == "<x>"
    assert unquotable(SimpleNamespace()) is None


def test_a_wait_too_short_for_another_poll_gives_up_after_one_look() -> None:
    import time

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, seen = engine(refuse)
    b = RemoteBackend("http://gen", "m", client=client, backoff=NO_RETRY)
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailableError, match="waited"):
        b.wait_ready(timeout_s=0.2, poll_s=1.0)
    assert time.monotonic() - t0 < 0.9 and len(seen) == 1


def test_an_answer_line_cut_by_max_tokens_gets_no_quote_call() -> None:
    """Even when what was cut is a word of the passage ("Rollo"), the candidate failed."""
    client, seen = engine(lambda r: answer("Answer: Rollo", [-0.5] * 3, "length"))
    [[c]] = RemoteBackend("http://gen", "m", client=client).generate([span_request(40)])
    assert c.text == "" and c.timings_ms["cut"] == 1.0 and len(seen) == 1
