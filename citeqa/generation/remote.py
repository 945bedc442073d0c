"""A generator served elsewhere: an OpenAI-compatible chat endpoint (vLLM, SGLang) over httpx.

The quote grammar travels as vLLM structured output (``"structured_outputs": {"grammar": ...}``,
vLLM >= 0.10) and under the older ``"guided_grammar"`` key (vLLM < 0.12); our grammars use
llguidance's Lark dialect (``%regex {"substring_words": ...}``), so start vLLM with the guidance
backend: ``vllm serve MODEL --structured-outputs-config.backend guidance``.
Errors of any kind surface as ``ModelError`` carrying the server's message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from citeqa.errors import ModelError
from citeqa.generation.backend import Completion, GenerationRequest

logger = logging.getLogger(__name__)


class RemoteBackend:
    """Backend that POSTs each request to ``{base_url}/v1/chat/completions``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60,
        client: httpx.Client | None = None,
        legacy_grammar_key: bool = True,
    ) -> None:
        """``base_url``: server root (without ``/v1``); ``model``: the served model name;
        ``client``: an httpx client to use (tests pass one with a ``MockTransport``);
        ``legacy_grammar_key``: also send ``guided_grammar`` for vLLM < 0.12."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.model_id = f"remote:{model}"
        self.legacy_grammar_key = legacy_grammar_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout_s)
        self._headers = headers
        self._timeout_s = timeout_s

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return [self._generate_one(r) for r in requests]

    def payload(self, req: GenerationRequest) -> dict[str, Any]:
        """The JSON body sent for ``req``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in req.messages],
            "n": req.n,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "logprobs": True,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.grammar is not None:
            body["structured_outputs"] = {"grammar": req.grammar}
            if self.legacy_grammar_key:
                body["guided_grammar"] = req.grammar
        return body

    def _generate_one(self, req: GenerationRequest) -> list[Completion]:
        url = f"{self.base_url}/v1/chat/completions"
        t0 = time.perf_counter()
        try:
            resp = self._client.post(
                url, json=self.payload(req), headers=self._headers, timeout=self._timeout_s
            )
        except httpx.HTTPError as e:
            raise ModelError(f"generator server {url} unreachable: {e}; is it running?") from e
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code >= 400:
            raise ModelError(
                f"generator server {url} answered {resp.status_code}: {_server_message(resp)}"
            )
        try:
            data = resp.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            completions = [_completion(c, elapsed_ms) for c in choices]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(
                f"generator server {url} sent an unexpected response ({e}): {resp.text[:200]}"
            ) from e
        if len(completions) != req.n:
            raise ModelError(f"generator server returned {len(completions)} choices, not {req.n}")
        return completions


def _completion(choice: dict[str, Any], elapsed_ms: float) -> Completion:
    text = choice["message"]["content"] or ""
    items = ((choice.get("logprobs") or {}).get("content")) or []
    logprob = float(sum(item["logprob"] for item in items))
    n_tokens = len(items)
    timings = {"request_ms": elapsed_ms, "tokens": float(n_tokens)}
    return Completion(text, logprob, n_tokens, timings)


def _server_message(resp: httpx.Response) -> str:
    """The error message in an OpenAI-style error body, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]
