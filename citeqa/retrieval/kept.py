"""Embeddings kept on disk while a command embeds, so that running it again after a crash, a
Ctrl-C or another writer's change embeds only what it had not embedded yet.

``KeptEmbedder(embedder, directory)`` is an ``Embedder``: it embeds its texts in parts of
``PART`` passages and writes each part to ``directory/<key>.npy`` before embedding the next,
where the key hashes the embedder's model id and dimension and the part's texts. The same texts
in the same order (``citeqa index add`` run again on the same sources) give the same parts,
which are read back instead of embedded. A part is written under a temporary name and renamed:
one under its key is whole. Keeping is best effort: a part that cannot be written is embedded
again next time, never an error. ``discard()`` removes the directory once the work is in place.

``citeqa index add`` keeps its parts in ``kept_dir(index)``, ``.NAME.add`` beside the index: a
successful add, an add that finds nothing left to add, and a rebuild (``index build``) remove it.

The vectors of a part are those its embedder gave when it was made; the dtype it computed in
(``auto`` chooses by measuring the CPU) is the one of that run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from citeqa.retrieval.embed import Embedder

log = logging.getLogger(__name__)

PART = 1024  # passages per kept part: ~30 s of CPU embedding in fp32, the most a crash loses


def kept_dir(index: Path) -> Path:
    """Where ``citeqa index add`` keeps its embeddings until its change is in (``.NAME.add``)."""
    index = Path(index)
    return index.parent / f".{index.name}.add"


def kept_passages(directory: Path) -> int:
    """How many passages' embeddings ``directory`` keeps (0 when there is none)."""
    total = 0
    for path in sorted(Path(directory).glob("*.npy")) if Path(directory).is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            total += len(np.load(path, mmap_mode="r"))  # reads the header only
    return total


def discard(directory: Path) -> None:
    """Remove kept parts (the work they were for is in place, or void)."""
    shutil.rmtree(directory, ignore_errors=True)


def part_key(model_id: str, dim: int, texts: Sequence[str]) -> str:
    """The name of the part holding the vectors of ``texts`` by this model."""
    h = hashlib.sha256(f"{model_id}\0{dim}\0{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


class KeptEmbedder:
    """``embedder``, keeping what it embeds in ``directory`` (see the module's docstring)."""

    def __init__(self, embedder: Embedder, directory: Path, *, part: int | None = None) -> None:
        part = PART if part is None else part
        if part < 1:
            raise ValueError(f"part must be at least 1, got {part}")
        self.embedder = embedder
        self.directory = Path(directory)
        self.part = part
        self.model_id = embedder.model_id
        self.dim = embedder.dim
        self.reused = 0  # passages read back from parts an earlier run kept

    def embed(self, texts: Sequence[str], *, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with tqdm(total=len(texts), desc="embedding", unit="passage", disable=not progress,
                  file=sys.stderr) as bar:
            for start in range(0, len(texts), self.part):
                chunk = texts[start:start + self.part]
                path = self.directory / f"{part_key(self.model_id, self.dim, chunk)}.npy"
                vectors = self._read(path, len(chunk))
                if vectors is None:
                    vectors = np.asarray(self.embedder.embed(chunk, batch_size=batch_size),
                                         dtype=np.float32).reshape(len(chunk), self.dim)
                    self._write(path, vectors)
                else:
                    self.reused += len(chunk)
                    bar.set_postfix(reused=self.reused)
                out[start:start + len(chunk)] = vectors
                bar.update(len(chunk))
        return out

    def _read(self, path: Path, rows: int) -> np.ndarray | None:
        """The part at ``path``, or None when there is none (or it is not a whole one)."""
        try:
            vectors = np.load(path)  # never a pickle: allow_pickle is False
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as e:
            log.warning("embeddings kept in %s are unreadable (%s): embedding again", path, e)
            return None
        if vectors.shape != (rows, self.dim) or vectors.dtype != np.float32:
            log.warning("embeddings kept in %s have shape %s: embedding again", path,
                        vectors.shape)
            return None
        return vectors

    def _write(self, path: Path, vectors: np.ndarray) -> None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                np.save(f, vectors)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError as e:  # a full or read-only disk: the work goes on, unkept
            log.warning("could not keep embeddings in %s (%s); a rerun embeds them again",
                        self.directory, e)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove the kept parts (the work they were for is in place)."""
        discard(self.directory)
