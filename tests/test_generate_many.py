"""CitedGenerator.generate_many: several questions, one backend call, same answers as alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from citeqa.config import GenerationConfig
from citeqa.generation.cited import CitedGenerator, GenerationItem
from citeqa.generation.extractive import extractive_responder
from citeqa.generation.fake import FakeBackend
from citeqa.types import Document, Hit, Passage

DOCS = {
    "n": Document("n", "Normans", "normans.txt",
                  "The Normans gave their name to Normandy, a region in France. "
                  "Their leader Rollo swore fealty to King Charles III of West Francia."),
    "h": Document("h", "Harvard", "harvard.txt",
                  "Harvard was founded in 1636. It is named after John Harvard, a clergyman."),
}


def hits(*doc_ids: str) -> list[Hit]:
    return [
        Hit(Passage(i, d, 0, len(DOCS[d].text), DOCS[d].text), DOCS[d].title, "", 1.0 - i / 10)
        for i, d in enumerate(doc_ids)
    ]


class CountingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__(extractive_responder)
        self.sizes: list[int] = []  # requests per generate() call

    def generate(self, requests):
        self.sizes.append(len(requests))
        return super().generate(requests)


ITEMS = [
    GenerationItem("Who was the leader of the Normans?", hits("n", "h"), DOCS.__getitem__),
    GenerationItem("When was Harvard founded?", hits("h", "n"), DOCS.__getitem__, 3),
    GenerationItem("Nothing to show", [], DOCS.__getitem__),
    GenerationItem("Who was the leader of the Normans?", hits("n"), DOCS.__getitem__, 1, "free"),
]


@pytest.mark.parametrize("constrain", [True, False])
def test_one_backend_call_and_same_candidates_as_one_by_one(constrain):
    backend = CountingBackend()
    gen = CitedGenerator(backend, GenerationConfig(model="fake"))
    many = gen.generate_many(ITEMS, constrain=constrain)
    # one call: item 0 one request; item 1 one per passage then one sampled when constrained,
    # else one sampled request; item 2 none; item 3 (free mode) one
    assert backend.sizes == [5 if constrain else 3]
    assert [len(g.candidates) for g in many] == [1, 3, 0, 1]
    for item, g in zip(ITEMS, many, strict=True):
        alone = gen.generate(item.question, item.hits, item.documents, n=item.n, mode=item.mode,
                             constrain=constrain)
        assert g.candidates == alone.candidates
    assert many[0].candidates[0].quote is not None
    assert many[1].timings_ms["batch_items"] == 4
    assert (backend.requests[0].grammar is not None) == constrain
    assert many[3].candidates[0].raw.startswith("Answer: ")  # the free-mode item


def test_covering_candidates_go_back_to_their_question():
    backend = CountingBackend()
    gen = CitedGenerator(backend, GenerationConfig(model="fake"))
    many = gen.generate_many([ITEMS[0], ITEMS[1]])
    assert backend.sizes == [4]  # item 0: one request; item 1: one per passage, one sampled
    assert [len(g.candidates) for g in many] == [1, 3]
    assert [c.quote.doc_id for c in many[1].candidates[:2]] == ["h", "n"]


def test_no_items_and_bad_n():
    backend = CountingBackend()
    gen = CitedGenerator(backend, GenerationConfig(model="fake"))
    assert gen.generate_many([]) == [] and backend.sizes == []
    with pytest.raises(ValueError, match="n must be at least 1"):
        gen.generate_many([replace(ITEMS[0], n=0)])
