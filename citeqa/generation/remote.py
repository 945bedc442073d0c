"""A generator served elsewhere: an OpenAI-compatible chat endpoint (vLLM, SGLang) over httpx.

The quote grammar travels as vLLM structured output (``"structured_outputs": {"grammar": ...}``,
vLLM >= 0.10); our grammars use llguidance's Lark dialect (``%regex {"substring_words": ...}``),
so start vLLM with the guidance backend (``--structured-outputs-config.backend guidance``; see
scripts/vllm_cpu.sh). vLLM ignores the older ``guided_grammar`` key, which is not sent unless
asked for (``legacy_grammar_key``).

Span mode takes two calls per candidate, as the local backend takes two grammars: the answer
line, then the quote, continuing that assistant message (``continue_final_message``) under the
grammar ``QuoteStage`` builds from the answer (a stretch of a passage that holds it).

The requests of a batch go out together, at most ``concurrency`` at a time, so the engine can
batch what the service's batcher collected. A call that cannot connect, or that the engine
turns away for now (429, 503), is retried with backoff honouring ``Retry-After`` within
``timeout_s``; a choice cut short by ``max_tokens`` (``finish_reason: "length"``), or one the
engine aborted, becomes a failed candidate, never a cut quote. Errors surface as
``EngineError`` (the engine answered with an error) or ``EngineUnavailableError`` (it could
not be reached), with its message; an ``EngineError`` answering one candidate's quote call
(its grammar is its own) fails that candidate only (timing ``quote_errors``), while others of
the question stand (all of them failing so, or the engine unavailable, fails the question).
One request of a batch failing ends the batch's other calls too: their results would be
dropped (a service then asks each question of the batch again, alone). Completions are streamed
(streamed.py): a call whose engine is gone ends within seconds, not at its timeout, and one
nobody waits for is closed, which makes the engine stop generating it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx

from citeqa.errors import EngineError, EngineUnavailableError
from citeqa.generation.backend import Completion, GenerationRequest, abandoned_completions
from citeqa.generation.chat import ANY_TEMPLATE_SPECIALS, defused_for_any_template
from citeqa.generation.format import ANSWER_LINE_END
from citeqa.generation.streamed import (
    ABANDONED,
    STALL_S,
    BadEvent,
    StreamEnded,
    Watch,
    post_streamed,
)
from citeqa.retry import RETRY_STATUSES, Backoff, parse_retry_after, request_by
from citeqa.text import without_userinfo

logger = logging.getLogger(__name__)

# finish_reasons of a choice that stopped before the model ended it: max_tokens ("length"), or
# the engine gave up on it ("abort": vLLM, SGLang), its text partial either way
CUT = frozenset({"length", "abort"})
GATEWAY_ERRORS = frozenset({502, 504})  # a proxy's: the engine behind it is down or starting
LOOK_S = 10.0  # at start-up: how long one look for the engine's models may take at least
HEALTH_PROBE_S = 2.0  # after a 5xx: how long /health may take to say whether the engine is up
HEALTH_RECHECKS_S = (0.5, 1.0)  # ... and the pauses before asking it again while it says so
# vLLM's (and other OpenAI-compatible engines') 400 for a prompt longer than the model's context
_CONTEXT_FULL = re.compile(r"context length|context window|max_model_len|prompt is too long",
                           re.IGNORECASE)


class _Abandoned(Exception):
    """Nobody waits for this request's answer any more: no further call for it."""


class RemoteBackend:
    """Backend that POSTs requests to ``{base_url}/v1/chat/completions``, concurrently."""

    # vLLM's llguidance reads a special token's text ("<|im_end|>") forced by a grammar as that
    # token, which its mask then offers and its matcher refuses: the request fails (a 500).
    # Its tokenizer is not at hand, so answers and quotes keep clear of every common template's
    # special texts (which its prompt breaks apart too: chat.defused_for_any_template).
    unquotable = ANY_TEMPLATE_SPECIALS

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120,
        concurrency: int = 8,
        client: httpx.Client | None = None,
        backoff: Backoff | None = None,
        legacy_grammar_key: bool = False,
        stall_s: float = STALL_S,
    ) -> None:
        """``base_url``: server root (``/v1`` is added); ``model``: the served model name (None:
        the only one ``/v1/models`` lists, asked on first use); ``concurrency``: requests in
        flight at once; ``client``: an httpx client (tests pass a ``MockTransport``);
        ``legacy_grammar_key``: also send ``guided_grammar``, for vLLM < 0.12; ``stall_s``: a
        call streamed that long without a word has the engine's /health asked whether it is
        gone (``streamed.Watch``)."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.shown_url = without_userinfo(self.base_url)  # for messages: never its password
        self._model = model
        self.legacy_grammar_key = legacy_grammar_key
        self.concurrency = max(1, int(concurrency))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=timeout_s, limits=httpx.Limits(max_connections=self.concurrency * 2))
        self._timeout_s = timeout_s
        self._backoff = backoff or Backoff(retries=4, base_s=0.5, max_s=10.0)
        # requests, and (span mode) the answer continuations of their choices: two pools, so
        # that a request waiting for its continuations never holds the threads they need; the
        # semaphore bounds the calls in flight
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="citeqa-remote")
        self._continue = ThreadPoolExecutor(self.concurrency, thread_name_prefix="citeqa-quote")
        self._in_flight = threading.BoundedSemaphore(self.concurrency)
        self._watch = Watch(self._engine_gone, stall_s=stall_s)
        self._roots: dict[str, str] = {}  # served name -> where the engine loaded it from
        self._closed = threading.Event()  # set by close(): every call in flight is abandoned

    # -- the engine ---------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model's name (asked of the engine once when not configured)."""
        if self._model is None:
            self._model = self.served_model()
        return self._model

    @property
    def model_id(self) -> str:
        """``remote:NAME``, and where the engine says the model comes from (vLLM's ``root``,
        the directory it loaded) once /v1/models was asked: a served name alone is the same
        for every model scripts/vllm_cpu.sh serves."""
        root = self._roots.get(self.model)
        return f"remote:{self.model}" + (f" ({root})" if root and root != self.model else "")

    def served_models(self, deadline: float | None = None) -> list[str]:
        """The names of the models the engine serves (``GET /v1/models``, within ``deadline``,
        default the timeout from now); EngineError when its answer is no such list."""
        limit = time.monotonic() + self._timeout_s
        data = self._call("GET", "/v1/models", None,
                          deadline=limit if deadline is None else min(deadline, limit))
        listed = data.get("data")
        names = ([m.get("id") if isinstance(m, dict) else None for m in listed]  # each an object
                 if isinstance(listed, list) else None)
        if names is None or not all(isinstance(n, str) and n for n in names):
            raise EngineError(f"the generator at {self.shown_url} sent an unexpected "
                              f"/v1/models response (no list of models with ids): "
                              f"{str(data)[:200]}")
        assert isinstance(listed, list)
        self._roots = {m["id"]: m["root"] for m in listed
                       if isinstance(m.get("root"), str) and m["root"]}
        return [str(n) for n in names]

    def served_model(self, deadline: float | None = None) -> str:
        """The only model the engine serves (``served_models``); EngineError when it serves
        several (name one) or none."""
        names = self.served_models(deadline)
        if len(names) != 1:
            raise EngineError(f"the generator at {self.shown_url} serves {names or 'no model'}; "
                              "name the one to use (CITEQA_GENERATOR_MODEL)")
        return names[0]

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
        """Block until the engine lists its model (a server starting up), at most
        ``timeout_s``; EngineUnavailableError when it never does, EngineError when it serves
        another model than the one named (or, none named, several)."""
        deadline = time.monotonic() + timeout_s
        while True:
            # no call outlives the wait, but each has ``LOOK_S`` at least (a wait of 0: one
            # look; a wait shorter than LOOK_S may take up to LOOK_S)
            by = max(deadline, time.monotonic() + LOOK_S)
            try:
                if self._model is None:
                    self._model = self.served_model(by)
                elif self._model not in (names := self.served_models(by)):
                    raise EngineError(f"the generator at {self.shown_url} serves "
                                      f"{names or 'no model'}, not {self._model!r}; fix "
                                      "CITEQA_GENERATOR_MODEL")
                return
            except EngineUnavailableError as e:
                if time.monotonic() + poll_s > deadline:
                    raise EngineUnavailableError(f"{e} (waited {timeout_s:.0f} s)") from e
                logger.info("waiting for the generator at %s: %s", self.shown_url, e)
                time.sleep(poll_s)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Every request, at most ``concurrency`` in flight; result[i] is request i's."""
        if not requests:
            return []
        failed = threading.Event()  # one request failed: the batch fails, others need no call
        futures = [self._pool.submit(self._generate_one, r, failed.is_set) for r in requests]
        wait(futures, return_when=FIRST_EXCEPTION)  # (all done, unless one failed)
        errors = [e for f in futures
                  if f.done() and not f.cancelled() and (e := f.exception()) is not None]
        if errors:
            failed.set()
            for f in futures:
                f.cancel()  # those not started; those running make no further call
            raise errors[0]
        return [f.result() for f in futures]

    def payload(self, req: GenerationRequest, *, grammar: str | None = None,
                continue_with: str | None = None, n: int | None = None) -> dict[str, Any]:
        """The JSON body for ``req`` (``grammar`` overrides its grammar; ``continue_with``
        continues an assistant message that starts so)."""
        messages = defused_for_any_template(req.messages)  # the engine renders the template
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "n": req.n if n is None else n,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "logprobs": True,
        }
        if continue_with is not None:
            messages.append({"role": "assistant", "content": continue_with})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if req.seed is not None:
            body["seed"] = req.seed
        grammar = req.grammar if grammar is None else grammar
        if grammar is not None:
            body["structured_outputs"] = {"grammar": grammar}
            if self.legacy_grammar_key:
                body["guided_grammar"] = grammar
        return body

    def _generate_one(self, req: GenerationRequest,
                      batch_failed: Callable[[], bool] = lambda: False) -> list[Completion]:
        def gone() -> bool:  # nobody will read this request's answer
            return req.is_abandoned() or batch_failed() or self._closed.is_set()

        if gone():  # waited for a free slot while its asker left (or its batch failed)
            return abandoned_completions(req)
        deadline = time.monotonic() + self._timeout_s
        t0 = time.perf_counter()
        try:
            first = self._choices(self.payload(req), req.n, deadline, gone)
        except _Abandoned:
            return abandoned_completions(req)
        if req.quote_stage is None:
            elapsed = (time.perf_counter() - t0) * 1000
            return [_completion(c, elapsed) for c in first]
        futures = [self._continue.submit(self._quote, req, choice, deadline, t0, gone)
                   for choice in first]  # span mode: each candidate's quote, from its answer
        out: list[Completion] = []
        errors: list[EngineError] = []
        for f in futures:
            try:
                out.append(f.result())
            except EngineUnavailableError:  # the engine is down, busy or out of time: for all
                raise
            except EngineError as e:  # this candidate's own call (its grammar is its own)
                errors.append(e)
                out.append(Completion("", 0.0, 0, {
                    "request_ms": (time.perf_counter() - t0) * 1000, "quote_errors": 1.0}))
        if errors and len(errors) == len(out):
            raise errors[0]  # none stands: the engine's error is the question's
        if errors:
            logger.warning("%d of %d candidates' quote calls failed (first: %s); they are "
                           "failed candidates, the others stand", len(errors), len(out), errors[0])
        return out

    def _quote(self, req: GenerationRequest, choice: dict[str, Any], deadline: float,
               t0: float, gone: Callable[[], bool]) -> Completion:
        """Span mode's second call: the quote, constrained to passages' stretches that hold
        the choice's answer."""
        assert req.quote_stage is not None
        text = (choice.get("message") or {}).get("content") or ""
        if not text.endswith(ANSWER_LINE_END):  # an engine may trim the line break it wrote
            text += ANSWER_LINE_END
        grammar = None if choice.get("finish_reason") in CUT else req.quote_stage.grammar(text)
        if grammar is None or gone():  # no quote to write, or nobody to read it
            return _completion(choice, (time.perf_counter() - t0) * 1000)
        body = self.payload(req, grammar=grammar, continue_with=text, n=1)
        body["max_tokens"] = max(req.max_tokens - _tokens(choice), 8)
        try:
            [second] = self._choices(body, 1, deadline, gone)
        except _Abandoned:
            return _completion(choice, (time.perf_counter() - t0) * 1000)
        return _joined(text, choice, second, (time.perf_counter() - t0) * 1000)

    def _choices(self, body: dict[str, Any], n: int, deadline: float,
                 abandoned: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        data = self._call("POST", "/v1/chat/completions", body, deadline=deadline,
                          abandoned=abandoned)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            for c in choices:  # everything later reads, read once here
                _completion(c, 0.0)
                content = c["message"].get("content")
                if content is not None and not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise EngineError(f"the generator sent an unexpected response ({e!r})") from e
        if len(choices) != n:
            raise EngineError(f"the generator returned {len(choices)} choices, not {n}")
        return choices

    def _call(self, method: str, path: str, body: dict[str, Any] | None, *,
              deadline: float, abandoned: Callable[[], bool] | None = None) -> dict[str, Any]:
        """One call, retried while the engine cannot be reached or turns it away for now, all
        within ``deadline`` (a body sent a byte at a time is cut off there too); _Abandoned
        instead of a retry once ``abandoned()`` (nobody waits for the answer)."""
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            if attempt and abandoned is not None and abandoned():
                raise _Abandoned
            try:
                resp = self._send(method, url, body, deadline, abandoned)
            except StreamEnded as e:
                if e.reason == ABANDONED:
                    raise _Abandoned from None
                raise EngineUnavailableError(
                    f"the generator at {self.shown_url} stopped while answering (no word for "
                    f"{self._watch.stall_s:g} s, and it no longer answers /health); try again "
                    "once it is back") from None
            except BadEvent as e:
                raise EngineError(f"the generator sent an unexpected stream event ({e})") from e
            except httpx.DecodingError as e:  # e.g. a body that says gzip and is not
                raise EngineError(f"the generator at {self.shown_url} sent a body that cannot "
                                  f"be decoded ({e})") from e
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                if self._backoff.wait(attempt, None, deadline):
                    attempt += 1
                    continue
                if isinstance(e, httpx.ConnectError):
                    raise EngineUnavailableError(f"the generator at {self.shown_url} cannot be "
                                                 f"reached ({e}); is it running?") from e
                raise EngineUnavailableError(  # it took the call, and broke off its answer
                    f"the generator at {self.shown_url} broke off its answer ({e}), each time "
                    "it was asked; is it restarting, or does a proxy in front of it cut "
                    "answers short?") from e
            except httpx.TimeoutException as e:
                raise EngineUnavailableError(
                    f"the generator at {self.shown_url} did not answer in time ({e}; a "
                    f"question may take {self._timeout_s:g} s: CITEQA_REQUEST_TIMEOUT_S)"
                ) from e
            if resp.status_code in RETRY_STATUSES and self._backoff.wait(
                    attempt, resp.headers.get("retry-after"), deadline):
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES:
                raise EngineUnavailableError(
                    f"the generator at {self.shown_url} is busy ({resp.status_code}: "
                    f"{_server_message(resp)})",
                    retry_after_s=parse_retry_after(resp.headers.get("retry-after")))
            if resp.status_code in GATEWAY_ERRORS:  # a proxy in front of an engine that is down
                raise EngineUnavailableError(
                    f"the generator at {self.shown_url} is not reachable behind its gateway "
                    f"({resp.status_code}: {_server_message(resp)})")
            if resp.status_code >= 500 and self._engine_down(deadline):
                # (vLLM answers the requests in flight 500 when its engine stops, even on a
                # plain SIGTERM: a restart, not an error of this request)
                raise EngineUnavailableError(
                    f"the generator at {self.shown_url} stopped while answering "
                    f"({resp.status_code}: {_server_message(resp)}); try again once it is back")
            if resp.status_code == 400 and _CONTEXT_FULL.search(message := _server_message(resp)):
                raise EngineError(
                    f"the prompt (the question and the passages shown with it) does not fit the "
                    f"generator's context at {self.shown_url}: ask with a smaller top_k, or "
                    f"start the engine with a longer context (vLLM: --max-model-len; "
                    f"scripts/vllm_cpu.sh: CITEQA_VLLM_MAX_LEN). It said: {message}")
            if resp.status_code >= 400:
                raise EngineError(f"the generator at {self.shown_url} answered "
                                  f"{resp.status_code}: {_server_message(resp)}")
            try:
                data = resp.json()
            except ValueError as e:
                raise EngineError(f"the generator sent no JSON: {resp.text[:200]!r}") from e
            if not isinstance(data, dict):
                raise EngineError("the generator sent an unexpected response (not an object)")
            return data

    def _engine_down(self, deadline: float) -> bool:
        """Whether the engine is gone or says it is unhealthy (vLLM's /health: 503 once its
        engine died), asked again after each of ``HEALTH_RECHECKS_S`` while it says it is up:
        vLLM fails its requests a moment before its /health says so (a signal to its whole
        process group); False where it stays up or has no /health."""
        for pause in (0.0, *HEALTH_RECHECKS_S):
            if time.monotonic() + pause >= deadline:
                return False
            time.sleep(pause)
            try:
                health = request_by(self._client, "GET", f"{self.base_url}/health",
                                    min(deadline, time.monotonic() + HEALTH_PROBE_S),
                                    headers=self._headers)
            except httpx.PoolTimeout:  # (every connection busy: this side's limit)
                return False
            except httpx.TimeoutException:  # slow, or out of time (the deadline's near): not
                return False  # known down (an engine's own 500 was said to be it stopping)
            except httpx.HTTPError:
                return True
            if health.status_code in RETRY_STATUSES | GATEWAY_ERRORS:
                return True
        return False

    def _engine_gone(self) -> bool:
        """Whether the engine is gone for sure: its /health refuses the connection or says it
        is down (502, 503, 504); not when it is merely slow to answer."""
        try:
            health = request_by(self._client, "GET", f"{self.base_url}/health",
                                time.monotonic() + HEALTH_PROBE_S, headers=self._headers)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            return False
        return health.status_code in GATEWAY_ERRORS | {503}

    def _send(self, method: str, url: str, body: dict[str, Any] | None, deadline: float,
              abandoned: Callable[[], bool] | None = None) -> httpx.Response:
        """One try, in one of the ``concurrency`` slots for calls in flight; a slot that frees
        only past ``deadline`` is a timeout (the call went out late, with a second's time at
        least, when it waited for one without limit). A POST is streamed (``streamed``):
        watched, it ends early once abandoned or once its engine is gone."""
        if not self._in_flight.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise httpx.PoolTimeout(f"all {self.concurrency} calls in flight were busy until "
                                    "the deadline")
        try:
            if method == "POST" and body is not None:
                return post_streamed(self._client, url, body, deadline, watch=self._watch,
                                     gone=abandoned or (lambda: False), headers=self._headers)
            return request_by(self._client, method, url, deadline, json=body,
                              headers=self._headers)
        finally:
            self._in_flight.release()

    def close(self) -> None:
        """Stop: calls not started are dropped, and those in flight are abandoned (their
        streams shut within the watch's beat, so the engine stops them and their threads end:
        Ctrl-C waited for them, up to the request timeout, before the process could exit)."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._continue.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _logprobs(choice: dict[str, Any]) -> list[float]:
    items = ((choice.get("logprobs") or {}).get("content")) or []
    return [float(item["logprob"]) for item in items]


def _tokens(choice: dict[str, Any]) -> int:
    return len(_logprobs(choice))


def _completion(choice: dict[str, Any], elapsed_ms: float) -> Completion:
    """A choice as a Completion; one cut short (max_tokens, or aborted) has no text (a failed
    candidate: a cut quote could still be verbatim, but it was not the quote the model
    meant)."""
    cut = choice.get("finish_reason") in CUT
    text = "" if cut else ((choice.get("message") or {}).get("content") or "")
    lps = _logprobs(choice)
    timings = {"request_ms": elapsed_ms, "tokens": float(len(lps)), "cut": float(cut)}
    return Completion(text, float(sum(lps)), len(lps), timings)


def _joined(answer_line: str, first: dict[str, Any], second: dict[str, Any],
            elapsed_ms: float) -> Completion:
    """A span-mode candidate from its two calls: the answer line (``first``'s text, with its
    line break), then the quote."""
    if second.get("finish_reason") in CUT:
        return _completion(second, elapsed_ms)
    text = answer_line + ((second.get("message") or {}).get("content") or "")
    lps = _logprobs(first) + _logprobs(second)
    timings = {"request_ms": elapsed_ms, "tokens": float(len(lps)), "cut": 0.0}
    return Completion(text, float(sum(lps)), len(lps), timings)


def _server_message(resp: httpx.Response) -> str:
    """The error message in an OpenAI-style error body, else the start of the body, on one
    line (another server's HTML page was ten lines of an error that says it is one)."""
    return " ".join(_server_text(resp).split())[:300] or resp.reason_phrase


def _server_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:2000]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]

