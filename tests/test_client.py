"""CiteqaClient: against the real app served by uvicorn on 127.0.0.1, and against MockTransport."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from helpers import CannedPipeline, free_port, running_server

from citeqa.api.app import create_app
from citeqa.client import (
    CiteqaAPIError,
    CiteqaClient,
    DocumentInfo,
    DocumentList,
    Readiness,
    answer_from_json,
    document_list_from_json,
    hit_from_json,
)
from citeqa.config import Settings
from citeqa.retry import Backoff
from citeqa.types import Answer, AskArgs, Candidate, Document, Hit, Passage, Quote

DOC = Document("doc/1", "T", "https://example.org/t", "Alpha beta gamma delta epsilon zeta.")
QUOTE = Quote("gamma delta", "doc/1", "T", DOC.source, 11, 22)
assert DOC.text[QUOTE.start:QUOTE.end] == QUOTE.text


class TinyPipeline(CannedPipeline):
    """One canned answer, hit and document."""

    corpus = [DOC]

    def answer(self, args: AskArgs) -> Answer:
        cand = Candidate("gamma", QUOTE, logprob=-2.0, n_tokens=4, score=0.8,
                         answer_start=11, answer_end=16)
        return Answer(args.question, False, "gamma", QUOTE, 0.8, 0.1, None, [cand],
                      {"total": 3.0}, passages=self.search(args.question),
                      answer_start=11, answer_end=16)

    def search(self, query: str, k: int = 10) -> list[Hit]:
        return [Hit(Passage(7, DOC.doc_id, 0, 10, DOC.text[:10]), "T", DOC.source, 0.3, 1.0, 0.2)]

    def document(self, doc_id: str) -> Document:
        if doc_id != DOC.doc_id:
            raise KeyError(doc_id)
        return DOC


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The real app on a real socket (uvicorn in a thread); yields its base URL."""
    app = create_app(Settings(api_keys="sekret", window_ms=1, max_body_bytes=2048),
                     lambda s: TinyPipeline())
    with running_server(app) as url:
        yield url


def test_answer_round_trips_into_types(server: str) -> None:
    with CiteqaClient(server, api_key="sekret") as client:
        ans = client.answer("what?", top_k=2, min_score=0.3)
        with_passages = client.answer("what?", with_passages=True)
    expected = TinyPipeline().ask("what?")
    assert ans == replace(expected, passages=[])  # passages only when asked for
    assert with_passages == expected and with_passages.passages
    assert DOC.text[ans.answer_start:ans.answer_end] == ans.answer


def test_list_documents(server: str) -> None:
    with CiteqaClient(server, api_key="sekret") as client:
        assert client.list_documents() == DocumentList(
            [DocumentInfo("doc/1", "T", DOC.source, len(DOC.text))], total=1, offset=0, limit=20,
            can_change=True)
        assert client.list_documents(offset=1, limit=5) == DocumentList([], 1, 1, 5, True)
        with pytest.raises(CiteqaAPIError) as err:
            client.list_documents(limit=101)
    assert err.value.status == 422 and err.value.details[0]["loc"] == ["query", "limit"]
    # a server before can_change does not say what the key may do
    older = {"documents": [], "total": 0, "offset": 0, "limit": 20}
    assert document_list_from_json(older).can_change is None
    assert document_list_from_json({**older, "can_change": False}).can_change is False


def test_search_and_document(server: str) -> None:
    with CiteqaClient(server, api_key="sekret") as client:
        assert client.search("alpha", k=3) == TinyPipeline().search("alpha")
        assert client.document("doc/1") == DOC  # a slash in the id is escaped
        with pytest.raises(CiteqaAPIError) as err:
            client.document("missing")
    assert err.value.status == 404 and err.value.code == "document_not_found"


def test_health_ready_and_auth(server: str) -> None:
    with CiteqaClient(server) as anonymous:
        assert anonymous.health() and anonymous.ready()
        with pytest.raises(CiteqaAPIError) as err:
            anonymous.answer("q")
    assert err.value.status == 401 and err.value.code == "unauthorized"


def test_validation_errors_surface_as_api_errors(server: str) -> None:
    with CiteqaClient(server, api_key="sekret") as client:
        with pytest.raises(CiteqaAPIError) as err:
            client.answer("q", top_k=500)
    assert err.value.status == 422 and err.value.details[0]["loc"] == ["body", "top_k"]


def test_chunked_oversized_body_is_413_over_a_real_socket(server: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"question": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = httpx.post(server + "/v1/answer", content=chunks(),
                   headers={"X-API-Key": "sekret", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unreachable_service_is_status_0() -> None:
    with CiteqaClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(CiteqaAPIError) as err:
            client.search("q")
        # the probes answer at once: nothing listening is not healthy, not ready
        assert client.health() is False and client.ready() is False
        assert client.readiness() == Readiness(False, reason="unreachable")
    assert err.value.status == 0 and err.value.code == "connection_error"


# -- MockTransport: what goes out and how odd responses are read --------------------------------


def test_requests_carry_the_key_and_only_given_options() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TinyPipeline().ask("q").to_json())

    client = CiteqaClient("http://svc", api_key="k", transport=httpx.MockTransport(handler))
    client.answer("q", n_candidates=3)
    assert seen[0].headers["authorization"] == "Bearer k"
    assert seen[0].url.path == "/v1/answer"
    assert json.loads(seen[0].content) == {"question": "q", "n_candidates": 3}


@pytest.mark.parametrize(
    ("response", "status", "code"),
    [
        (httpx.Response(502, text="<html>bad gateway</html>"), 502, "http_error"),
        (httpx.Response(503, json={"error": {"code": "overloaded", "message": "m"}}), 503,
         "overloaded"),
        (httpx.Response(500, json=["not", "an", "error"]), 500, "http_error"),
        (httpx.Response(200, text="not json"), 200, "bad_response"),
        (httpx.Response(200, json=[1, 2]), 200, "bad_response"),
    ],
)
def test_odd_responses_become_api_errors(response: httpx.Response, status: int,
                                         code: str) -> None:
    client = CiteqaClient("http://svc", transport=httpx.MockTransport(lambda r: response),
                          backoff=Backoff(retries=0))
    with pytest.raises(CiteqaAPIError) as err:
        client.search("q")
    assert (err.value.status, err.value.code) == (status, code)


def test_a_body_of_another_shape_is_bad_response_for_every_call() -> None:
    """document() raised a bare KeyError('doc_id') for a body that was not a document."""
    client = CiteqaClient("http://svc", backoff=Backoff(retries=0), transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"documents": [], "total": 0})))
    for call in (lambda: client.document("d1"), lambda: client.search("q"),
                 lambda: client.answer("q")):
        with pytest.raises(CiteqaAPIError) as err:
            call()
        assert (err.value.status, err.value.code) == (200, "bad_response")
    odd = CiteqaClient("http://svc", backoff=Backoff(retries=0), transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"question": "q", "declined": False,
                                            "candidates": [1]})))  # not objects
    with pytest.raises(CiteqaAPIError, match="unexpected body"):
        odd.answer("q")


def test_a_call_ends_within_its_timeout_however_slowly_the_service_sends() -> None:
    """The timeout bounded each read, not the call ("seconds a call may take"): a body sent a
    piece at a time held a 1 s call for 5.9 s."""
    def trickle():  # type: ignore[no-untyped-def]
        for _ in range(40):
            time.sleep(0.1)
            yield b" "

    client = CiteqaClient("http://svc", timeout=0.5, backoff=Backoff(retries=0),
                          transport=httpx.MockTransport(
                              lambda r: httpx.Response(200, content=trickle())))
    t0 = time.monotonic()
    with pytest.raises(CiteqaAPIError) as err:
        client.search("q")
    assert err.value.code == "timeout" and time.monotonic() - t0 < 2.0  # not the body's 4 s


def test_undecodable_bodies_and_a_readiness_page_that_is_not_json_are_bad_response() -> None:
    """A body that says gzip and is not raised httpx.DecodingError, and a 200 /readyz page
    that is not JSON (a proxy's) a JSONDecodeError: neither a CiteqaAPIError."""
    gzip_lie = httpx.MockTransport(lambda r: httpx.Response(
        200, headers={"Content-Encoding": "gzip"}, content=iter([b"not gzip at all"])))
    client = CiteqaClient("http://svc", transport=gzip_lie, backoff=Backoff(retries=0))
    for call in (lambda: client.search("q"), client.readiness, client.health):
        with pytest.raises(CiteqaAPIError, match="cannot be decoded") as err:
            call()
        assert err.value.code == "bad_response"
    page = CiteqaClient("http://svc", transport=httpx.MockTransport(
        lambda r: httpx.Response(200, text="<html>welcome</html>")))
    with pytest.raises(CiteqaAPIError, match="without JSON") as err:
        page.readiness()
    assert err.value.code == "bad_response"


def test_ids_a_url_reads_as_a_path_are_refused_before_sending() -> None:
    """"." became /v1/documents/ (the list, parsed as a document), ".." the routes above."""
    sent: list[httpx.Request] = []
    client = CiteqaClient("http://svc", transport=httpx.MockTransport(
        lambda r: sent.append(r) or httpx.Response(404)))  # type: ignore[func-returns-value]
    for doc_id in ("", ".", ".."):
        with pytest.raises(ValueError, match="is not a document id"):
            client.document(doc_id)
        with pytest.raises(ValueError, match="is not a document id"):
            client.delete_document(doc_id)
    assert sent == []
    with pytest.raises(CiteqaAPIError):
        client.document("a/..")  # an id: sent, escaped
    assert sent[0].url.raw_path == b"/v1/documents/a%2F.."


def test_arguments_no_call_could_send_are_value_errors_naming_them_before_sending() -> None:
    """The client review's: a lone surrogate was UnicodeEncodeError's traceback, a NaN score
    json's "Out of range float values", a url with a title the service's 422."""
    sent: list[httpx.Request] = []
    client = CiteqaClient("http://svc", transport=httpx.MockTransport(
        lambda r: sent.append(r) or httpx.Response(404)))  # type: ignore[func-returns-value]
    for call, name in ((lambda: client.answer("bad \ud800"), "question"),
                       (lambda: client.search("x\udc80"), "query"),
                       (lambda: client.add_document("t \ud83d"), "text"),
                       (lambda: client.add_document("t", title="\udfff"), "title"),
                       (lambda: client.document("a\ud800"), "doc_id"),
                       (lambda: client.delete_document("a\ud800"), "doc_id")):
        with pytest.raises(ValueError, match=rf"^{name} holds a lone surrogate \(U\+D"):
            call()
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"min_score is {value}; give a finite number"):
            client.answer("q", min_score=value)
    for kw in ({"title": "Ex"}, {"source": "s"}):
        with pytest.raises(ValueError, match="title and source go with text"):
            client.add_document(url="https://example.com/", **kw)
    assert sent == []


def test_an_api_error_survives_pickling() -> None:
    """Rebuilt from its text alone it could not be made: a worker of a process pool that
    raised one broke the pool (BrokenProcessPool, not the 401)."""
    import copy
    import pickle

    err = CiteqaAPIError(401, "unauthorized", "no key", {"hint": "send one"})
    err.add_note("asked by worker 3")  # (state set on it after: kept too)
    for back in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert (back.status, back.code, back.message, back.details, str(back)) == (
            401, "unauthorized", "no key", {"hint": "send one"}, str(err))
        assert back.__notes__ == ["asked by worker 3"]


def test_a_timeout_under_a_second_is_kept() -> None:
    """A 0.3 s client timeout took 1 s (a floor of 1 s under each try)."""
    import socket

    with socket.socket() as silent:  # accepts (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        client = CiteqaClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3,
                              backoff=Backoff(retries=0))
        t0 = time.monotonic()
        with pytest.raises(CiteqaAPIError) as err:
            client.search("q")
        assert err.value.code == "timeout" and time.monotonic() - t0 < 0.8


def test_a_call_turned_away_for_now_is_retried_honouring_retry_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("citeqa.retry.time.sleep", slept.append)
    busy = {"error": {"code": "overloaded", "message": "m"}}
    responses = iter([httpx.Response(503, json=busy, headers={"Retry-After": "3"}),
                      httpx.Response(429, json=busy),
                      httpx.Response(200, json={"hits": []})])
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(responses)

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(handler),
                          backoff=Backoff(retries=3, base_s=0.25))
    assert client.search("q") == []
    assert len(seen) == 3 and slept[0] == 3.0 and 0 <= slept[1] <= 0.5


@pytest.mark.parametrize("status", [500, 502, 504])
def test_an_error_that_is_not_a_not_now_is_not_retried(status: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 429 and 503 say "not now": a server's failure or a gateway's is said at once (a
    retry would ask a failing server again, and a 504's question may still be running)."""
    monkeypatch.setattr("citeqa.retry.time.sleep", lambda s: None)
    calls: list[int] = []

    def failing(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, json={"error": {"code": "x", "message": "m"}})

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(failing),
                          backoff=Backoff(retries=3))
    with pytest.raises(CiteqaAPIError):
        client.search("q")
    assert len(calls) == 1


def test_retries_stop_after_the_budget_and_at_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("citeqa.retry.time.sleep", lambda s: None)
    calls: list[int] = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"error": {"code": "overloaded", "message": "m"}},
                              headers={"Retry-After": "1"})

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(busy),
                          backoff=Backoff(retries=2))
    with pytest.raises(CiteqaAPIError) as err:
        client.search("q")
    assert err.value.code == "overloaded" and len(calls) == 3
    calls.clear()
    late = CiteqaClient("http://svc", transport=httpx.MockTransport(busy), timeout=0.5,
                        backoff=Backoff(retries=5))
    with pytest.raises(CiteqaAPIError):
        late.search("q")
    assert len(calls) == 1  # a 1 s Retry-After does not fit in a 0.5 s budget


def test_ready_is_false_on_503_and_raises_on_other_errors() -> None:
    responses = iter([
        httpx.Response(503, json={"error": {"code": "not_ready", "message": "m"}}),
        httpx.Response(503, json={"error": {"code": "shutting_down", "message": "m"}}),
        httpx.Response(200, json={"status": "ready", "index_version": "0123456789abcdef"}),
        httpx.Response(404, json={"error": {"code": "not_found", "message": "m"}}),
        httpx.Response(503, json={"error": {"code": "load_failed", "message": "bad index"}})])
    client = CiteqaClient("http://svc", transport=httpx.MockTransport(lambda r: next(responses)))
    assert client.ready() is False
    assert client.readiness() == Readiness(False, reason="shutting_down")
    assert client.readiness() == Readiness(True, index_version="0123456789abcdef")
    with pytest.raises(CiteqaAPIError):
        client.ready()
    with pytest.raises(CiteqaAPIError) as err:  # waiting will not change it: not False
        client.ready()
    assert err.value.code == "load_failed"


def test_json_decoders_invert_to_json() -> None:
    ans = TinyPipeline().ask("q")
    assert answer_from_json(ans.to_json(with_passages=True)) == ans
    assert answer_from_json(ans.to_json()) == replace(ans, passages=[])
    declined = Answer("q", True, None, None, None, reason="no support")
    assert answer_from_json(declined.to_json(with_candidates=False)) == declined
    hit: Any = TinyPipeline().search("q")[0]
    assert hit_from_json(hit.to_json()) == hit
    # a BM25-only index's raw scores keep saying so (the reward model must not read them as
    # fused ones when a saved answer is scored again: evals/reward_compare.py)
    assert ans.candidates and ans.passages
    raw = replace(ans, candidates=[replace(c, retrieval_fused=False) for c in ans.candidates],
                  passages=[replace(h, fused=False) for h in ans.passages])
    assert answer_from_json(raw.to_json(with_passages=True)) == raw
    assert not hit_from_json(replace(hit, fused=False).to_json()).fused
    old = {k: v for k, v in ans.to_json(with_passages=True).items()}  # before the flags existed
    old["candidates"] = [{k: v for k, v in c.items() if k != "retrieval_fused"}
                         for c in old["candidates"]]
    old["passages"] = [{k: v for k, v in h.items() if k != "fused"} for h in old["passages"]]
    assert answer_from_json(old) == ans


def test_add_and_delete_documents_over_mock_transport() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.raw_path.decode(), body))
        if request.method == "POST":
            return httpx.Response(201, json={"doc_id": "a/b", "title": "T", "source": "",
                                             "passages": 2})
        if request.url.raw_path.endswith(b"missing"):
            return httpx.Response(404, json={"error": {"code": "document_not_found",
                                                       "message": "no", "details": None}})
        return httpx.Response(204)

    with CiteqaClient("http://svc", transport=httpx.MockTransport(handler)) as c:
        assert c.add_document("Some text.", doc_id="a/b")["passages"] == 2
        c.add_document(url="https://example.org/x")
        c.delete_document("a/b")
        with pytest.raises(CiteqaAPIError) as info:
            c.delete_document("missing")
        assert info.value.status == 404 and info.value.code == "document_not_found"
        with pytest.raises(ValueError):
            c.add_document("t", url="https://example.org/")
    assert seen[:3] == [("POST", "/v1/documents", {"text": "Some text.", "doc_id": "a/b"}),
                        ("POST", "/v1/documents", {"url": "https://example.org/x"}),
                        ("DELETE", "/v1/documents/a%2Fb", None)]


def test_add_document_says_what_is_missing_before_sending() -> None:
    client = CiteqaClient("http://127.0.0.1:9")  # nothing is sent
    with pytest.raises(ValueError, match="give the document's text or a url"):
        client.add_document()
    with pytest.raises(ValueError, match="not both"):
        client.add_document("text", url="https://example.org")


def test_a_service_that_failed_to_load_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("citeqa.retry.time.sleep", slept.append)
    calls: list[int] = []

    def failed(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"error": {"code": "load_failed", "message": "no index"}})

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(failed),
                          backoff=Backoff(retries=3))
    with pytest.raises(CiteqaAPIError) as err:
        client.search("q")
    assert err.value.code == "load_failed" and len(calls) == 1 and slept == []


@pytest.mark.parametrize("method", ["add", "delete"])
def test_a_change_is_sent_again_only_after_the_services_nothing_done_codes(
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """A proxy's 503 may come after the service made the change: sent again, the add was a 409
    "exists" and the delete a 404, the opposite of what happened."""
    monkeypatch.setattr("citeqa.retry.time.sleep", lambda s: None)
    answers: list[httpx.Response] = []
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return answers.pop(0)

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(handler),
                          backoff=Backoff(retries=3))

    def change() -> None:
        if method == "add":
            client.add_document("text", doc_id="x")
        else:
            client.delete_document("x")

    done = httpx.Response(201, json={"doc_id": "x", "title": "", "source": "", "passages": 1}
                          ) if method == "add" else httpx.Response(204)
    for code in ("not_ready", "overloaded", "shutting_down"):  # turned away before any work
        calls.clear()
        answers[:] = [httpx.Response(503, json={"error": {"code": code, "message": "m"}}), done]
        change()
        assert len(calls) == 2
    for proxy in (httpx.Response(503, text="<html>Service Unavailable</html>"),
                  httpx.Response(429, text="slow down"),
                  httpx.Response(503, json={"error": {"code": "engine_unavailable",
                                                      "message": "m"}})):
        calls.clear()
        answers[:] = [proxy, done]
        with pytest.raises(CiteqaAPIError) as err:
            change()
        assert len(calls) == 1 and err.value.status == proxy.status_code
    # a question changes nothing: it is asked again after any 503
    calls.clear()
    answers[:] = [httpx.Response(503, text="<html>Service Unavailable</html>"),
                  httpx.Response(200, json={"hits": []})]
    assert client.search("q") == [] and len(calls) == 2


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://127.0.0.1:8000",
                                 "http://", " http://127.0.0.1:8000"])
def test_a_base_url_without_scheme_or_host_is_refused_at_once(url: str) -> None:
    """It read as a service still starting: readiness() said unreachable, forever."""
    with pytest.raises(ValueError, match="not an http:// or https:// URL with a host"):
        CiteqaClient(url)


def test_a_connection_broken_after_sending_says_the_call_may_be_done() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(broken))
    with pytest.raises(CiteqaAPIError, match="may or may not be done") as err:
        client.add_document("text")
    assert err.value.status == 0 and err.value.code == "connection_error"


def test_a_redirect_says_where_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "307 http_error: Temporary Redirect" and not where (an http:// base URL in front
    of an https:// service, a path moved behind a proxy)."""
    moved = httpx.Response(307, headers={"Location": "https://svc/v1/answer"})
    client = CiteqaClient("http://svc", transport=httpx.MockTransport(lambda r: moved))
    with pytest.raises(CiteqaAPIError, match=r"Temporary Redirect \(to https://svc/v1/answer: "
                                             "the client follows no redirects"):
        client.answer("q")


def test_a_call_that_could_not_be_sent_says_nothing_was() -> None:
    """An API key with a line break is refused by httpx before sending: it was said to be a
    connection broken after sending, the call perhaps done."""
    def never(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError("Illegal header value b'abc\\ndef'")

    client = CiteqaClient("http://svc", transport=httpx.MockTransport(never))
    with pytest.raises(CiteqaAPIError, match=r"could not be sent \(nothing was\)") as err:
        client.add_document("text")
    assert err.value.status == 0 and err.value.code == "request_error"
