"""citeqa.retrieval: chunking, BM25, dense embeddings, fusion, the index directory and search.

    documents -> passage_spans (chunk_document) -> passages -> BM25Index + DenseIndex -> index
    directory
    query -> HybridRetriever.search -> BM25 / dense rankings -> rrf -> hits
"""

from citeqa.retrieval.bm25 import BM25Index
from citeqa.retrieval.builder import BuildSummary, build_index, build_index_from_documents
from citeqa.retrieval.chunk import chunk_document
from citeqa.retrieval.dense import DenseIndex
from citeqa.retrieval.embed import Embedder, HashEmbedder, MiniLMEmbedder, load_embedder
from citeqa.retrieval.fusion import rrf
from citeqa.retrieval.retriever import HybridRetriever
from citeqa.retrieval.store import Index
from citeqa.text import tokenize

__all__ = [
    "BM25Index",
    "BuildSummary",
    "DenseIndex",
    "Embedder",
    "HashEmbedder",
    "HybridRetriever",
    "Index",
    "MiniLMEmbedder",
    "build_index",
    "build_index_from_documents",
    "chunk_document",
    "load_embedder",
    "rrf",
    "tokenize",
]
