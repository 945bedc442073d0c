"""The page at / in a real headless Chromium (Playwright) against the REAL app (tiny preset)
served by uvicorn on 127.0.0.1. Skips when Chromium or Playwright is missing (CI installs both:
see .ci/run)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import running_server

from citeqa.api.app import create_app
from citeqa.config import Settings, preset
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Document

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/citeqa-page.png")
DOCS = [
    Document("normans", "Normans", "https://en.wikipedia.org/wiki/Normans",
             "The Normans were the people who in the 10th and 11th centuries gave their name to "
             "Normandy, a region in France. Their leader Rollo swore fealty to King Charles III "
             "of West Francia. The Norman dynasty had a major political, cultural and military "
             "impact on medieval Europe."),
    Document("eiffel", "Eiffel Tower", "eiffel.txt",
             "The Eiffel Tower is a wrought-iron lattice tower in Paris. "
             "It opened in 1889 as the entrance to the World's Fair."),
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("browser")
    build_index_from_documents(DOCS, tmp / "idx", preset("tiny").retrieval, progress=False)
    settings = Settings(preset="tiny", index=tmp / "idx", cache_dir=tmp / "cache", window_ms=1)
    app = create_app(settings)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {e}")
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base_url + "/")
        yield page
        browser.close()
        assert errors == [], errors  # no CSP violations, no script errors


def ask(page: object, question: str) -> None:
    page.fill("#q", question)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector("#out p.answer", timeout=15_000)  # type: ignore[attr-defined]


def test_an_answer_shows_its_score_and_the_quote_marked_in_the_source(page: object) -> None:
    ask(page, "Who did Rollo swear fealty to?")
    out = page.locator("#out")  # type: ignore[attr-defined]
    answer = out.locator("p.answer").inner_text()
    assert "Charles" in answer and "Declined" not in answer
    assert out.locator("text=/^score \\d\\.\\d{3}$/").count() == 1
    box = out.locator("blockquote")
    mark = box.locator("mark")
    assert mark.count() == 1
    quote = mark.inner_text()
    assert len(quote) >= 20 and quote in DOCS[0].text
    # the mark sits inside the source passage, with the document's text around it
    assert box.inner_text().replace("\u2026", "") in DOCS[0].text
    link = out.locator("a")
    assert link.inner_text() == "Normans" and link.get_attribute("href") == DOCS[0].source
    page.screenshot(path=str(SCREENSHOT), full_page=True)  # type: ignore[attr-defined]


def test_a_decline_is_shown_as_such(page: object, base_url: str) -> None:
    # The page sends no min_score; ask the same question the way the page does, with a route
    # that adds one, so the decline comes from the real pipeline.
    def add_min_score(route: object) -> None:
        import json

        body = json.loads(route.request.post_data)  # type: ignore[attr-defined]
        route.continue_(post_data=json.dumps({**body, "min_score": 1.0}))  # type: ignore[attr-defined]

    page.route("**/v1/answer", add_min_score)  # type: ignore[attr-defined]
    try:
        ask(page, "When did the Eiffel Tower open?")
    finally:
        page.unroute("**/v1/answer")  # type: ignore[attr-defined]
    out = page.locator("#out")  # type: ignore[attr-defined]
    assert out.locator("p.answer.declined").inner_text() == "Declined to answer."
    assert "threshold" in out.inner_text()
    assert out.locator("mark").count() == 0 and out.locator("blockquote").count() == 0
    page.screenshot(path="/tmp/citeqa-page-declined.png", full_page=True)  # type: ignore[attr-defined]
