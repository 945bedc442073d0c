"""RemoteBackend against a mocked OpenAI-compatible server (httpx.MockTransport, no network)."""

from __future__ import annotations

import json

import httpx
import pytest

from citeqa.errors import ModelError
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.remote import RemoteBackend

MSGS = ({"role": "user", "content": "q?"},)


def server(handler):
    seen: list[httpx.Request] = []

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return httpx.Client(transport=httpx.MockTransport(wrapped)), seen


def choice(i: int, text: str, lps: list[float] | None) -> dict:
    out: dict = {"index": i, "message": {"role": "assistant", "content": text},
                 "finish_reason": "stop"}
    out["logprobs"] = None if lps is None else {
        "content": [{"token": "t", "logprob": lp} for lp in lps]}
    return out


def test_payload_and_parsing():
    def handler(request):
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [
            choice(1, "Answer: b", [-0.5, -0.25]),
            choice(0, "Answer: a", [-1.0]),
        ][: body["n"]]})

    client, seen = server(handler)
    b = RemoteBackend("http://gen:8000/v1/", "smol", api_key="k", client=client)
    req = GenerationRequest(messages=MSGS, grammar="start: \"x\"", n=2, temperature=0.7,
                            max_tokens=32, seed=3)
    [[c0, c1]] = b.generate([req])
    assert (c0.text, c0.logprob, c0.n_tokens) == ("Answer: a", -1.0, 1)
    assert (c1.text, c1.logprob, c1.n_tokens) == ("Answer: b", -0.75, 2)
    [request] = seen
    assert str(request.url) == "http://gen:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    body = json.loads(request.content)
    assert body["messages"] == [{"role": "user", "content": "q?"}]
    assert (body["n"], body["temperature"], body["max_tokens"], body["seed"]) == (2, 0.7, 32, 3)
    assert body["logprobs"] is True
    assert body["structured_outputs"] == {"grammar": 'start: "x"'}
    assert body["guided_grammar"] == 'start: "x"'


def test_no_grammar_no_logprobs():
    client, seen = server(lambda r: httpx.Response(200, json={"choices": [choice(0, "hi", None)]}))
    b = RemoteBackend("http://gen", "smol", client=client, legacy_grammar_key=False)
    [[c]] = b.generate([GenerationRequest(messages=MSGS)])
    assert (c.text, c.logprob, c.n_tokens) == ("hi", 0.0, 0)
    body = json.loads(seen[0].content)
    assert "structured_outputs" not in body and "guided_grammar" not in body
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    "response, needle",
    [
        (httpx.Response(400, json={"error": {"message": "bad grammar"}}), "bad grammar"),
        (httpx.Response(422, json={"detail": "bad field"}), "bad field"),
        (httpx.Response(500, text="boom"), "boom"),
        (httpx.Response(200, json={"nope": 1}), "unexpected response"),
        (httpx.Response(200, text="not json"), "unexpected response"),
    ],
)
def test_server_errors_become_model_errors(response, needle):
    client, _ = server(lambda r: response)
    b = RemoteBackend("http://gen", "smol", client=client)
    with pytest.raises(ModelError, match=needle):
        b.generate([GenerationRequest(messages=MSGS)])


def test_wrong_choice_count_and_unreachable():
    client, _ = server(lambda r: httpx.Response(200, json={"choices": [choice(0, "x", [])]}))
    with pytest.raises(ModelError, match="1 choices"):
        RemoteBackend("http://gen", "m", client=client).generate(
            [GenerationRequest(messages=MSGS, n=2, temperature=1.0)])

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    client, _ = server(refuse)
    with pytest.raises(ModelError, match="unreachable"):
        RemoteBackend("http://gen", "m", client=client).generate([GenerationRequest(messages=MSGS)])
