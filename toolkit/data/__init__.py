"""Corpus sources -> plain text documents -> a corpus folder with a train/val split."""

from toolkit.data.corpus import build_corpus, iter_documents, read_manifest, write_corpus
from toolkit.data.sources import documents

__all__ = ["build_corpus", "documents", "iter_documents", "read_manifest", "write_corpus"]
