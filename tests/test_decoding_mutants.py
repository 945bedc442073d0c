"""Mutation-testing round 8 (the local generator's decoding: hf.py, kv.py, lean.py, lm_head.py):
tests that kill mutants the suite let through. Each names what it pins down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import packaged_generator, packaged_tokenizer, tiny_llama
from torch import nn

from citeqa.generation.backend import GenerationRequest

MESSAGES = (
    {"role": "system", "content": "Reply as:\nAnswer: <short answer>\nQuote [k]: <exact words "
                                  "from passage k>"},
    {"role": "user", "content": "Passages:\n[1] The Normans gave their name to Normandy, a "
                                "region in northern France.\n\nQuestion: Who named Normandy?"},
)
OTHER = (MESSAGES[0], {"role": "user", "content": "Say something about Rollo, please."})


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer()


tiny_model = tiny_llama


def reference_greedy(model, tokenizer, prompt: list[int], n: int, stop: set[int]):
    """transformers' own greedy continuation of ``prompt`` (no cache tricks) and the sum of
    its tokens' log-probabilities, stopping at a stop token."""
    ids = list(prompt)
    out, logprob = [], 0.0
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            if tok in stop:
                break
            logprob += float(torch.log_softmax(logits, -1)[tok])
            out.append(tok)
            ids.append(tok)
    return out, logprob


@pytest.mark.slow
def test_unconstrained_greedy_output_equals_a_plain_forward_over_the_whole_sequence(tokenizer):
    """Prefill positions (after the cached system turn, left-padded in a batch, prefilled one
    by one or together), the decode steps' position ids and masks: every row's greedy output
    and log-probability equal a cache-free forward over the whole text, with and without
    drafts. (Killed: prefill positions off by one, decode positions off by one.)"""
    from citeqa.generation.hf import HFBackend

    model = tiny_model(len(tokenizer))
    requests = [GenerationRequest(messages=m, max_tokens=16) for m in (MESSAGES, OTHER)]
    refs = {}
    for batch_prefill in (False, True):
        for spec in (0, 8):
            backend = HFBackend(model, tokenizer, "tiny", speculative_tokens=spec,
                                batch_prefill=batch_prefill)
            stop = set(backend._stop)
            outs = backend.generate(requests)
            for i, (r, [c]) in enumerate(zip(requests, outs, strict=True)):
                if i not in refs:
                    refs[i] = reference_greedy(
                        model, tokenizer, backend.prompt_ids(r.messages), r.max_tokens, stop)
                ref, lp = refs[i]
                assert c.text == tokenizer.decode(ref, skip_special_tokens=True)
                assert c.n_tokens == len(ref)
                assert c.logprob == pytest.approx(lp, abs=1e-3)


@pytest.mark.slow
def test_a_token_budget_is_never_exceeded_with_or_without_drafts(tokenizer):
    """``max_tokens`` bounds every output, whether the budget ends on a sampled token, on
    forced tokens or on an accepted draft, and drafts change no output at any budget.
    (Killed: budget compared with > in ``_accept``/``finished``, forced tokens cut one late.)"""
    from citeqa.generation.constraint import QuoteStage, output_grammar
    from citeqa.generation.hf import HFBackend

    passages = ["Rollo swore fealty to King Charles III of West Francia.",
                "King Charles III ruled West Francia after the Viking raids."]
    model = tiny_model(len(tokenizer), 1)
    backends = {spec: HFBackend(model, tokenizer, "tiny", speculative_tokens=spec,
                                reuse_prefix=False) for spec in (0, 8)}
    grammar = output_grammar(passages, mode="span", max_answer_chars=40)
    for budget in range(1, 40):
        request = GenerationRequest(messages=MESSAGES, max_tokens=budget, grammar=grammar,
                                    quote_stage=QuoteStage(tuple(passages), 10, 120))
        outs = {}
        for spec, backend in backends.items():
            backend._recent = np.zeros(0, dtype=np.int64)
            [[outs[spec]]] = backend.generate([request])
            assert outs[spec].n_tokens <= budget, (spec, budget, outs[spec].text)
        assert outs[8].text == outs[0].text and outs[8].n_tokens == outs[0].n_tokens


def test_a_row_cut_inside_a_four_byte_character_leaves_it_out() -> None:
    """A four-byte character (an emoji, a CJK extension) cut after 3 of its bytes needs 3 bytes
    dropped. (Killed: at most 2 dropped.)"""
    from citeqa.generation.hf import decoded

    class Bytes:  # a byte-level tokenizer: a token per byte
        def decode(self, tokens, skip_special_tokens=True):  # type: ignore[no-untyped-def]
            return bytes(tokens).decode("utf-8", errors="replace")

    whole = list("Quote [1]: ok \U0001F600".encode())
    for missing in (1, 2, 3):
        assert decoded(Bytes(), whole[:-missing], cut=True) == "Quote [1]: ok "


def test_sampling_at_a_low_temperature_sharpens_and_the_logprob_is_at_temperature_one():
    """``choose`` samples from softmax(logits / T) and reports the temperature-1
    log-probability. (Killed: logits * T; the log-probability at T.)"""
    from citeqa.generation.lm_head import choose

    logits = torch.tensor([0.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(0)
    picks = [choose((None, logits), 0.05, g) for _ in range(200)]
    assert {tok for tok, _ in picks} == {1}
    expected = float(torch.log_softmax(logits, -1)[1])
    assert all(lp == pytest.approx(expected, abs=1e-6) for _, lp in picks)
    ids = torch.tensor([7, 9, 11])  # the narrowed form: ids of the allowed tokens
    assert choose((ids, logits), 0.0, None) == (9, pytest.approx(expected, abs=1e-6))


class _Allowed:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def allowed_mask(self) -> np.ndarray:
        return self.mask


class _HeadModel:
    def __init__(self, head: nn.Linear) -> None:
        self.config = type("C", (), {})()
        self.head = head

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


def test_a_head_with_a_bias_scores_the_allowed_tokens_as_the_full_vocabulary_does():
    """A few allowed tokens are scored from their rows of the head alone: the bias counts
    there as in the full logits; a bf16 head is scored from an fp32 copy. (Killed: the bias
    left out of the narrowed scores; the copy kept in bf16.)"""
    from citeqa.generation.lm_head import LMHead

    torch.manual_seed(0)
    linear = nn.Linear(16, 64, bias=True)
    with torch.no_grad():
        linear.bias.normal_(0, 3.0)
    head = LMHead(_HeadModel(linear))
    hidden = torch.randn(16)
    allowed = np.zeros(64, dtype=bool)
    allowed[[3, 17, 40]] = True
    ids, logits = head.scores(hidden, _Allowed(allowed))
    assert ids is not None and ids.tolist() == [3, 17, 40]
    full = head.logits(hidden)
    assert torch.allclose(logits, full[[3, 17, 40]], atol=1e-5)
    wide = allowed.copy()
    wide[:20] = True  # too many for the narrowed path: -inf elsewhere, the same logits
    none, masked = head.scores(hidden, _Allowed(wide))
    assert none is None and torch.equal(masked[wide], full[wide])
    assert torch.isinf(masked[~wide]).all()

    bf16 = LMHead(_HeadModel(linear.to(torch.bfloat16)))
    assert bf16.weight.dtype == torch.float32 and bf16.bias.dtype == torch.float32
    assert bf16.logits(hidden.to(torch.bfloat16)).dtype == torch.float32


@pytest.fixture(scope="module")
def smollm2():
    """The packaged generator in fp32 (drafts there agree with the model's choices)."""
    return packaged_generator("fp32")


@pytest.mark.slow
def test_seeded_samples_do_not_depend_on_speculation(smollm2):
    """Sampled rows skip drafts (a greedy acceptance test would change the distribution): the
    same seed gives the same samples with ``speculative_tokens`` 0 or 8. (Killed: drafts for
    sampled rows.)"""
    from citeqa.generation.constraint import output_grammar

    passages = ["The Normans gave their name to Normandy, a region in northern France."]
    request = GenerationRequest(messages=MESSAGES, max_tokens=40, n=2, temperature=0.3, seed=5,
                                grammar=output_grammar(passages, max_answer_chars=40))
    recent = smollm2._recent.copy()
    outs = {}
    try:
        for spec in (0, 8):
            smollm2.speculative_tokens = spec
            smollm2._recent = recent.copy()
            outs[spec] = [(c.text, c.n_tokens, round(c.logprob, 3))
                          for c in smollm2.generate([request])[0]]
    finally:
        smollm2.speculative_tokens = 8
    assert outs[8] == outs[0]


@pytest.mark.slow
def test_a_budget_an_accepted_draft_fills_ends_the_row(smollm2):
    """SmolLM2 copies the answer from the prompt in whole drafts: a budget that such a draft
    fills exactly ends the row there, not one sampled token later. (Killed: ``_accept``
    marking a row done only past its budget.)"""
    from citeqa.generation.constraint import output_grammar

    passages = ["The Normans gave their name to Normandy, a region in northern France."]
    grammar = output_grammar(passages, max_answer_chars=40)
    for budget in (8, 10, 16):
        [[c]] = smollm2.generate([GenerationRequest(messages=MESSAGES, grammar=grammar,
                                                    max_tokens=budget)])
        assert c.n_tokens <= budget, (budget, c.text)


# -- second part: cut rows, stop tokens, samples' forced text, the cached system turn ----------

SHORT_MESSAGES = (
    {"role": "system", "content": "Reply in a few words."},
    {"role": "user", "content": "Where is the Imperial Palace?"},
)


def scripted(monkeypatch, tokens: list[int]) -> None:
    """Make the backend choose ``tokens`` in turn, whatever the model says (log-prob 0)."""
    from citeqa.generation import hf

    left = iter(tokens)
    monkeypatch.setattr(hf, "choose", lambda scores, temperature, generator: (next(left), 0.0))


@pytest.mark.slow
def test_a_row_without_a_grammar_cut_by_its_budget_inside_a_character_leaves_it_out(
        tokenizer, monkeypatch):
    """An unconstrained row (no grammar truncates it to where it could end) whose budget ran
    out inside a character's bytes is decoded as cut: the character is left out, not written
    as U+FFFD. (Killed: ``cut`` only for a row past its budget, which none is.)"""
    from citeqa.generation.hf import HFBackend

    whole = tokenizer.encode("Tokyo 東京", add_special_tokens=False)
    assert tokenizer.decode(whole[:6]).endswith("\ufffd")  # SmolLM2 splits 京 in two tokens
    backend = HFBackend(tiny_llama(len(tokenizer)), tokenizer, "tiny", speculative_tokens=0)
    for budget, text in ((6, "Tokyo 東"), (len(whole), "Tokyo 東京")):
        scripted(monkeypatch, whole)
        [[c]] = backend.generate([GenerationRequest(messages=SHORT_MESSAGES, max_tokens=budget)])
        assert (c.text, c.n_tokens) == (text, budget)


def preferring(monkeypatch, tokens: list[int]) -> None:
    """Make the backend choose, of the tokens the grammar allows, the first of ``tokens``."""
    from citeqa.generation import hf

    def choose(scores, temperature, generator):  # type: ignore[no-untyped-def]
        ids, logits = scores
        allowed = (set(ids.tolist()) if ids is not None
                   else set(torch.isfinite(logits).nonzero()[:, 0].tolist()))
        return next(t for t in tokens if t in allowed), -1.0

    monkeypatch.setattr(hf, "choose", choose)


@pytest.mark.slow
def test_every_sample_of_a_request_keeps_the_forced_text_that_could_end_it(
        tokenizer, monkeypatch):
    """The grammar forces "Answer: yes." (a whole output), then a row may go on; a row its
    budget cuts before it could end again keeps that text, in each of the ``n`` samples, not
    only the first. (Killed: the other rows' last accepting point reset to 0, and forced
    tokens not marking where the output could end: the rows came out empty.)"""
    from citeqa.generation.hf import HFBackend

    grammar = 'start: "Answer: yes." tail?\ntail: "\\nMore: " /[a-z]+/ "!"\n'
    preferring(monkeypatch, [198, *tokenizer.encode(" abc", add_special_tokens=False),
                             *tokenizer.encode("abc", add_special_tokens=False)])
    backend = HFBackend(tiny_llama(len(tokenizer)), tokenizer, "tiny", speculative_tokens=0)
    for budget in (9, 11):  # cut inside "\nMore: abcabc...", which never ends
        outs = backend.generate([GenerationRequest(messages=SHORT_MESSAGES, max_tokens=budget,
                                                   grammar=grammar, n=3, temperature=1.0,
                                                   seed=1)])
        assert [(c.text, c.n_tokens) for c in outs[0]] == [("Answer: yes.", budget)] * 3


@pytest.mark.slow
def test_a_new_system_text_replaces_the_cached_system_turn(tokenizer, monkeypatch):
    """The system turn's keys and values are cached for the last system text seen: a request
    with another system text computes and caches its own, and the next request with that text
    prefills only what follows it. (Killed: the first system text's cache kept for every
    other text, which then shares next to nothing of it and is prefilled whole, always.)"""
    from citeqa.generation.hf import HFBackend
    from citeqa.generation.kv import MIN_PREFIX

    backend = HFBackend(tiny_llama(len(tokenizer)), tokenizer, "tiny", speculative_tokens=0)
    widths = []
    real = backend._forward

    def spy(ids, cache, mask, positions, *, keep, stats):  # type: ignore[no-untyped-def]
        widths.append(ids.shape[1])
        return real(ids, cache, mask, positions, keep=keep, stats=stats)

    monkeypatch.setattr(backend, "_forward", spy)
    other = ({"role": "system", "content": "Quote a passage word for word, then stop."},
             SHORT_MESSAGES[1])
    for messages in (SHORT_MESSAGES, other, other):
        widths.clear()
        [[c]] = backend.generate([GenerationRequest(messages=messages, max_tokens=1)])
        text, prefix = backend.prefix_cache.last
        assert text == messages[0]["content"] and len(prefix.tokens) >= MIN_PREFIX
        prompt = backend.prompt_ids(messages)
        assert prompt[: len(prefix.tokens)] == prefix.tokens
        assert widths[0] == len(prompt) - len(prefix.tokens)


@pytest.mark.slow
def test_a_stop_token_ends_a_row_and_is_not_one_of_its_tokens(tokenizer, monkeypatch):
    """A row that chooses a stop token ends there: the stop token is not counted in its
    ``n_tokens`` (nor in its budget), and an output of one stop token is empty. (Killed: the
    stop token appended to the row before the check.)"""
    from citeqa.generation.hf import HFBackend

    backend = HFBackend(tiny_llama(len(tokenizer)), tokenizer, "tiny", speculative_tokens=0)
    stop = min(backend._stop)
    words = tokenizer.encode("Tokyo 東京", add_special_tokens=False)
    for tokens, text in ((words, "Tokyo 東京"), ([], "")):
        scripted(monkeypatch, [*tokens, stop])
        [[c]] = backend.generate([GenerationRequest(messages=SHORT_MESSAGES, max_tokens=16)])
        assert (c.text, c.n_tokens) == (text, len(tokens))
    scripted(monkeypatch, [*words, stop])  # a budget the text fills exactly: no stop needed
    [[c]] = backend.generate([GenerationRequest(messages=SHORT_MESSAGES, max_tokens=len(words))])
    assert (c.text, c.n_tokens) == ("Tokyo 東京", len(words))


@pytest.mark.slow
def test_a_row_cut_by_its_budget_keeps_what_it_chose_up_to_where_it_could_end(
        tokenizer, monkeypatch):
    """The row chooses "yes." (the output could end there), then goes on into a part its
    budget cuts before it could end again: it keeps "Answer: yes.", where its own chosen
    token last let it end. (Killed: only forced tokens marking that point: empty.)"""
    from citeqa.generation.hf import HFBackend

    grammar = 'start: "Answer: " /[a-z]+/ "." tail?\ntail: "\\nMore: " /[a-z]+/ "!"\n'
    enc = [tokenizer.encode(s, add_special_tokens=False) for s in (".", "\n", " yes", "yes")]
    assert all(len(e) == 1 for e in enc)
    preferring(monkeypatch, [e[0] for e in enc])
    backend = HFBackend(tiny_llama(len(tokenizer)), tokenizer, "tiny", speculative_tokens=0)
    for budget in (10, 12):
        [[c]] = backend.generate([GenerationRequest(messages=SHORT_MESSAGES, max_tokens=budget,
                                                    grammar=grammar)])
        assert (c.text, c.n_tokens) == ("Answer: yes.", budget)
