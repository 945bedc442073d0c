"""citeqa.redteam: questions that look answerable but are not, made from any corpus, and the
``citeqa redteam`` report of how often the service answers them anyway.

    passages -> corpus.Corpus (words, names, numbers)      seeds (answerable questions, or
    writer.write_questions from the passages) -> maker.make_variants (unanswerable kinds +
    paraphrase controls, each checked against the corpus) -> run.ask_all -> run.summarize
"""

from citeqa.redteam.corpus import Corpus
from citeqa.redteam.maker import KINDS, UNANSWERABLE_KINDS, Seed, Variant, make_variants
from citeqa.redteam.writer import write_questions

__all__ = [
    "KINDS",
    "UNANSWERABLE_KINDS",
    "Corpus",
    "Seed",
    "Variant",
    "make_variants",
    "write_questions",
]
