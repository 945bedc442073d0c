"""The verifier: a fine-tuned cross-encoder that reads the question, a candidate answer, its quote
and the passage around the quote, and gives the probability that the answer is right and
supported by the quote.

    question  [SEP]  answer | title: ...before << quote >> after...
       |                                  |
    encoder (all-MiniLM-L6-v2 fine-tuned, or any Hugging Face encoder directory)
       |-- reader: start/end logits over the tokens (extractive QA, trained on SQuAD: where in
       |           this passage is the answer? [CLS] when nowhere)
       |-- K heads, each MLP([CLS] state, log P_reader(the candidate's span), log P_reader(none))
       `-- score = mean of the K sigmoids; uncertainty = their standard deviation

The reader is an auxiliary task and an agreement signal: does a reader find THIS answer here?
It never needs the generator's log-probabilities, so any generator (a remote engine included)
can be judged. Pure parts (rendering a candidate as text, mapping its answer to tokens) are
functions; ``Verifier`` is the network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from citeqa.compute import PAD_MULTIPLE
from citeqa.text import normalize_answer

CONTEXT_CHARS = 240  # passage text shown on each side of the quote
MAX_TOKENS = 192  # the encoder reads at most this many tokens per candidate
QUOTE_OPEN, QUOTE_CLOSE = " << ", " >> "
ANSWER_SEP = " | "


@dataclass(frozen=True)
class Judged:
    """One candidate as the verifier reads it."""

    question: str
    answer: str
    quote: str  # "" when the quote failed verification
    title: str = ""
    before: str = ""  # the passage right before the quote (up to CONTEXT_CHARS)
    after: str = ""  # right after it


def around(text: str, start: int, end: int, chars: int = CONTEXT_CHARS) -> tuple[str, str]:
    """The text before ``[start, end)`` and after it, at most ``chars`` each, cut at spaces."""
    before = text[max(0, start - chars):start]
    if start - chars > 0 and " " in before:
        before = before[before.index(" ") + 1:]
    after = text[end:end + chars]
    if end + chars < len(text) and " " in after:
        after = after[: after.rindex(" ")]
    return before, after


def render(x: Judged) -> tuple[str, str, tuple[int, int] | None]:
    """``(text_a, text_b, answer_span)``: the question; the answer and the marked passage; and
    where the answer stands inside the quote part of ``text_b`` (characters), or None when its
    words are not there (a free-mode answer the quote does not hold)."""
    head = f"{x.answer}{ANSWER_SEP}{x.title}:"
    before = f" {x.before.strip()}" if x.before.strip() else ""
    quote_at = len(head) + len(before) + len(QUOTE_OPEN)
    text_b = f"{head}{before}{QUOTE_OPEN}{x.quote}{QUOTE_CLOSE}{x.after.strip()}"
    span = _find(x.answer, x.quote)
    return x.question, text_b, None if span is None else (quote_at + span[0], quote_at + span[1])


def _find(answer: str, quote: str) -> tuple[int, int] | None:
    """The answer's first occurrence in the quote: exact, else case-insensitive (offsets into
    ``quote`` itself: ``quote.lower()`` can be longer, "İ" lowers to two characters)."""
    answer = answer.strip()
    if not answer:
        return None
    i = quote.find(answer)
    if i >= 0:
        return i, i + len(answer)
    m = re.search(re.escape(answer), quote, re.IGNORECASE)
    return None if m is None else m.span()


def gold_span(text_b: str, golds: Sequence[str], answer: str) -> tuple[int, int] | None:
    """Where a gold answer stands in the passage part of ``text_b`` (after the copy of the
    candidate's ``answer`` ``render`` puts first, which may itself hold the separator), for the
    reader's target; None when none does (the reader should point at [CLS])."""
    start = len(answer) + len(ANSWER_SEP) if text_b.startswith(answer + ANSWER_SEP) else 0
    for g in golds:
        g = g.strip()
        if g and normalize_answer(g):
            i = text_b.find(g, start)
            if i >= 0:
                return i, i + len(g)
    return None


def char_to_tokens(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None],
                   span: tuple[int, int] | None) -> tuple[int, int]:
    """Token indices (first, last) of a character span of text_b; (0, 0) ([CLS]) when the span
    is None or was truncated away."""
    if span is None:
        return 0, 0
    first = last = None
    for i, ((s, e), seq) in enumerate(zip(offsets, sequence_ids, strict=True)):
        if seq != 1 or e <= s:
            continue
        if first is None and e > span[0]:
            first = i
        if s < span[1]:
            last = i
    if first is None or last is None or last < first:
        return 0, 0
    return first, last


@dataclass
class Batch:
    """Encoded candidates: model inputs and, per row, the candidate's answer tokens."""

    input_ids: Tensor  # [N, S]
    attention_mask: Tensor  # [N, S]
    token_type_ids: Tensor | None  # [N, S]
    answer_tokens: Tensor  # [N, 2] (first, last) of the candidate's answer; (0, 0) none
    gold_tokens: Tensor | None = None  # [N, 2] the reader's target; (0, 0) = [CLS]


MIN_SECOND_TOKENS = 64  # of a pair's second text (the passage side) a long question leaves


def fitting_firsts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """``texts``, the first texts of pairs (questions), each cut at a token's end where it
    would leave the second text fewer than ``MIN_SECOND_TOKENS`` of ``max_tokens`` (a third
    of a smaller budget), special tokens counted; a text that fits is as it was. Truncating
    only the passage side fails on a question that alone fills the budget, and the service
    takes questions of 1,000 characters (~190 MiniLM tokens of English, fewer characters of
    Chinese)."""
    reserve = min(MIN_SECOND_TOKENS, max_tokens // 3)
    room = max(1, max_tokens - tokenizer.num_special_tokens_to_add(pair=True) - reserve)
    out = list(texts)  # (measured in tokens: a Hangul syllable is up to three of MiniLM's)
    if out:
        enc = tokenizer(out, add_special_tokens=False, return_offsets_mapping=True)
        for i, offsets in enumerate(enc["offset_mapping"]):
            if len(offsets) > room:
                out[i] = out[i][:offsets[_whole_characters(offsets, room) - 1][1]]
    return out


def _whole_characters(offsets: Sequence[tuple[int, int]], n: int) -> int:
    """The most of the first ``n`` tokens (their character ``offsets``; 1 at least; ``n``
    below their number) that end where a character ends: the jamo tokens of one Hangul
    syllable share its offsets, and a cut after the first kept all of them."""
    while n > 1 and offsets[n][0] < offsets[n - 1][1]:
        n -= 1
    return n


TITLE_TOKENS = 16  # of a title, what is kept where the whole would push the quote out of view


def quotes_in_view(tokenizer: Any, items: Sequence[Judged], firsts: Sequence[str],
                   max_tokens: int, *, with_answer: bool = True) -> list[Judged]:
    """``items`` with what comes before the quote cut where, beside its question (``firsts``),
    it would push the quote past ``max_tokens``: the title to ``TITLE_TOKENS`` tokens, then
    the passage before the quote from its start (truncating the second text from its end, as
    the encoding does, dropped the quote itself after a long title or question: a wrong quote
    then scored as the right one). An item that fits is as it was."""
    out = list(items)
    whole = tokenizer(list(firsts), [render(x)[1] for x in items])["input_ids"] if out else []
    over = [i for i, ids in enumerate(whole) if len(ids) > max_tokens]  # (most fit: as they were)
    if not over:
        return out
    counted = {name: tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
               ["offset_mapping"] for name, texts in (
                   ("first", [firsts[i] for i in over]), ("title", [out[i].title for i in over]),
                   ("before", [out[i].before for i in over]),
                   ("rest", [(f"{out[i].answer}{ANSWER_SEP}" if with_answer else "")
                             + f"{QUOTE_OPEN}{out[i].quote}{QUOTE_CLOSE}" for i in over]))}
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for at, i in enumerate(over):
        x = out[i]
        title, before = counted["title"][at], counted["before"][at]
        # (a margin of 2: the ":" after the title, a piece that tokenizes apart otherwise)
        room = (max_tokens - specials - len(counted["first"][at]) - len(counted["rest"][at]) - 2)
        if len(title) + len(before) > room:  # the title first: to TITLE_TOKENS, or less
            most = max(0, min(TITLE_TOKENS, room))  # where the rest leaves less than that
            if len(title) > most:
                n = _whole_characters(title, most) if most else 0
                if n == 1 and title[1][0] < title[0][1]:  # its first character alone is more
                    n = 0
                x = replace(x, title=x.title[:title[n - 1][1]] if n else "")
                title = title[:n]
        keep = max(0, room - len(title))
        if len(before) > keep:
            first = len(before) - keep  # its first token kept, moved on to start a character
            while 0 < first < len(before) and before[first][0] < before[first - 1][1]:
                first += 1
            x = replace(x, before=x.before[before[first][0]:] if first < len(before) else "")
        out[i] = x
    return out


def encode(tokenizer: Any, items: Sequence[Judged], *, golds: Sequence[Sequence[str]] | None
           = None, max_tokens: int = MAX_TOKENS) -> Batch:
    """Tokenize candidates as (question, answer + marked passage) pairs, truncating the
    passage side (and a question too long to leave it ``MIN_SECOND_TOKENS``:
    ``fitting_firsts``), and locate each answer (and gold answer, for training) in tokens."""
    firsts = fitting_firsts(tokenizer, [x.question for x in items], max_tokens)
    items = quotes_in_view(tokenizer, items, firsts, max_tokens)
    rendered = [render(x) for x in items]
    enc = tokenizer(firsts, [b for _, b, _ in rendered],
                    truncation="only_second", max_length=max_tokens, padding=True,
                    pad_to_multiple_of=PAD_MULTIPLE, return_offsets_mapping=True,
                    return_tensors="pt")
    answer_tokens, gold_tokens = [], []
    for i, (_, text_b, span) in enumerate(rendered):
        offsets = enc["offset_mapping"][i].tolist()
        seq = enc.sequence_ids(i)
        answer_tokens.append(char_to_tokens(offsets, seq, span))
        if golds is not None:
            gold_tokens.append(char_to_tokens(offsets, seq,
                                              gold_span(text_b, golds[i], items[i].answer)))
    return Batch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_type_ids=enc.get("token_type_ids"),
        answer_tokens=torch.tensor(answer_tokens, dtype=torch.long),
        gold_tokens=torch.tensor(gold_tokens, dtype=torch.long) if golds is not None else None,
    )


class Verifier(nn.Module):
    """Encoder + reader head + ``members`` verifier heads (see the module docstring)."""

    def __init__(self, encoder: nn.Module, members: int = 3, hidden: int = 128) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"the ensemble needs at least one member, got {members}")
        self.encoder = encoder
        dim = int(encoder.config.hidden_size)
        self.members, self.hidden = members, hidden
        self.reader = nn.Linear(dim, 2)  # start/end logits per token
        self.w1 = nn.Parameter(torch.randn(members, dim + 2, hidden) / (dim + 2) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(members, hidden))
        self.w2 = nn.Parameter(torch.randn(members, hidden) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(members))

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [K, N], start_logits [N, S], end_logits [N, S])``."""
        kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None:
            kw["token_type_ids"] = batch.token_type_ids
        hidden = self.encoder(**kw).last_hidden_state.float()  # [N, S, H]; bf16 when served
        reader = self.reader(hidden).float()  # [N, S, 2]; bf16 under training autocast
        pad = batch.attention_mask == 0
        start = reader[..., 0].masked_fill(pad, -1e4)  # [N, S]
        end = reader[..., 1].masked_fill(pad, -1e4)
        log_s, log_e = F.log_softmax(start, -1), F.log_softmax(end, -1)
        rows = torch.arange(len(start))
        first, last = batch.answer_tokens[:, 0], batch.answer_tokens[:, 1]
        span = log_s[rows, first] + log_e[rows, last]  # [N]; the [CLS] score when none
        null = log_s[:, 0] + log_e[:, 0]  # [N]
        found = (first > 0).to(span.dtype)  # a candidate without a located answer: no span
        features = torch.cat([hidden[:, 0], (span * found)[:, None],
                              null[:, None]], dim=1)  # [N, H + 2]
        h = torch.relu(torch.einsum("nd,kdh->knh", features, self.w1) + self.b1[:, None])
        logits = torch.einsum("knh,kh->kn", h, self.w2) + self.b2[:, None]  # [K, N]
        return logits, start, end

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(mean member probability [N], their standard deviation [N])."""
        logits, _, _ = self(batch)
        p = torch.sigmoid(logits)
        return p.mean(0), p.std(0, unbiased=False)
