"""The page at / in a real headless Chromium (Playwright) against the REAL app (tiny preset)
served by uvicorn on 127.0.0.1, with an API key set. Each state a person sees is driven and
photographed: answered, declined, error, document view, document list, add, delete, and a
narrow viewport. Skips when Chromium or Playwright is missing (CI installs both: see .ci/run).

Screenshots go to a temporary directory, or to ``$CITEQA_SCREENSHOTS`` when it is set
(``CITEQA_SCREENSHOTS=docs/screenshots`` refreshes the ones in docs/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import running_server

from citeqa.api.app import create_app
from citeqa.config import Settings, preset
from citeqa.ingest import Fetcher, FetchPolicy
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Document

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "sekret-key"
READ_KEY = "reader-key"  # may ask and read, not change the index
VIEWPORT = {"width": 960, "height": 660}
# A document is untrusted input: every view must show this one's markup as text.
EVIL_TITLE = "<img src=x onerror=\"window.__pwned='title'\"> Grimwald <b>notes</b>"
EVIL_TEXT = ("Castle Grimwald stands on a rock. <script>window.__pwned = 'script'</script> "
             "The moat of Castle Grimwald is filled with <b>silver eels</b> and "
             "<img src=x onerror=\"window.__pwned='img'\"> pike. "
             "<a href=\"javascript:window.__pwned='link'\">Visit</a> the gatehouse.")
# Long enough that the page must scroll to show the quote near its end.
HARBOUR_TEXT = "".join(
    f"Entry {i} of the harbour log records calm weather and routine traffic.\n\n"
    for i in range(1, 60)
) + "The harbour lighthouse was first lit in 1783 by keeper Amos Trelawny.\n"
# Characters outside the BMP before the quote: the API counts them as one character each, a
# JavaScript string as two.
CHEESE_TEXT = ("\U0001F40D\U0001F40D\U0001F40D Emoji first \U0001F600\U0001F600. The favourite "
               "cheese of Cedric Vasseur is Reblochon, aged for eight weeks in a cellar.")
DOCS = [
    Document("normans", "Normans", "https://en.wikipedia.org/wiki/Normans",
             "The Normans were the people who in the 10th and 11th centuries gave their name to "
             "Normandy, a region in France. Their leader Rollo swore fealty to King Charles III "
             "of West Francia. The Norman dynasty had a major political, cultural and military "
             "impact on medieval Europe."),
    Document("eiffel", "Eiffel Tower", "eiffel.txt",
             "The Eiffel Tower is a wrought-iron lattice tower in Paris. "
             "It opened in 1889 as the entrance to the World's Fair."),
    Document("harbour", "Harbour log", "https://example.org/harbour-log", HARBOUR_TEXT),
    Document("evil", EVIL_TITLE, "javascript:window.__pwned='source'", EVIL_TEXT),
    Document("cheese", "Cheese notes", "cheese.txt", CHEESE_TEXT),
    # enough small documents that the list has a second page (the page shows 20 at a time)
    *(Document(f"note-{i:02d}", f"Catalogue note {i}", f"notes/{i:02d}.txt",
               f"Catalogue note {i}: shelf {i} holds ledgers bound in blue cloth.")
      for i in range(1, 19)),
]
PAGE_HTML = ("<html><head><title>Glimmer moths</title><script>window.__pwned='fetched'</script>"
             "</head><body><p>Glimmer moths migrate across the Vessik plateau every spring, "
             "guided by &lt;polarised&gt; moonlight.</p></body></html>")

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

Page = Any  # playwright.sync_api.Page (imported lazily above, so no annotation from it)


def offline_fetcher() -> Fetcher:
    """https://example.org/moths is PAGE_HTML; every other URL is a 404 (no network)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moths":
            return httpx.Response(200, headers={"Content-Type": "text/html"}, text=PAGE_HTML)
        return httpx.Response(404, text="not here")

    return Fetcher(FetchPolicy(), transport=httpx.MockTransport(handler),
                   resolver=lambda host, port: ["93.184.216.34"])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("browser")
    build_index_from_documents(DOCS, tmp / "idx", preset("tiny").retrieval, progress=False)
    settings = Settings(preset="tiny", index=tmp / "idx", cache_dir=tmp / "cache", window_ms=1,
                        api_keys=KEY, read_api_keys=READ_KEY)
    with running_server(create_app(settings, fetcher=offline_fetcher())) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {e}")
        yield browser
        browser.close()


def open_page(browser: Any, base_url: str, viewport: dict[str, int], path: str = "/",
              key: str = KEY) -> tuple[Page, list[str]]:
    """A fresh page at ``path`` with the API key typed in; also the list its script errors and
    console errors (CSP violations included) are collected into."""
    context = browser.new_context(viewport=viewport)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + path)
    page.fill("#key", key)
    return page, errors


def wait_until_held(page: Page, held: list[Any], what: str) -> None:
    """Wait (5 s at most) for a request a test's route holds back."""
    for _ in range(100):
        if held:
            return
        page.wait_for_timeout(50)
    raise AssertionError(what)


@pytest.fixture(scope="module")
def page(browser: Any, base_url: str) -> Iterator[Page]:
    page, errors = open_page(browser, base_url, VIEWPORT)
    yield page
    pwned = page.evaluate("window.__pwned")
    page.context.close()
    assert pwned is None, pwned
    # no script errors and no CSP violations; the only failed loads are the errors the tests
    # provoke (401 without the key, 404 for an unknown document, 409 for a duplicate, 422 for
    # a blank question, 502 for a page that could not be fetched, 503 busy)
    expected = re.compile(r"^Failed to load resource: .* status of (401|404|409|422|502|503) ")
    assert [e for e in errors if not expected.match(e)] == [], errors


@pytest.fixture(scope="module")
def shoot(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``shoot(page, name)``: a PNG of the page (of the viewport with ``full_page=False``)."""
    folder = Path(os.environ.get("CITEQA_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(page: Page, name: str, *, full_page: bool = True) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        shrink(path)
        return path

    return shoot


def shrink(path: Path) -> None:
    """Rewrite a screenshot as a 64-colour palette PNG (a third of the size, and the text reads
    the same) when Pillow is installed, so the ones kept in docs/ stay small."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def ask(page: Page, question: str) -> None:
    """Ask from the ask view, submitting with Enter, and wait for the result."""
    if not page.is_visible("#ask-view"):
        page.click("nav >> text=Ask")
    page.fill("#q", question)
    page.press("#q", "Enter")  # the page swaps the last result for a spinner at once
    page.wait_for_selector("#out .spinner", state="detached", timeout=15_000)
    page.wait_for_selector("#out article")


def declining(page: Page) -> Callable[[], None]:
    """Make the page's next questions carry min_score 1.0 (so the real pipeline declines);
    returns the undo. The page itself never sends a threshold."""

    def add_min_score(route: Any) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "min_score": 1.0}))

    page.route("**/v1/answer", add_min_score)
    return lambda: page.unroute("**/v1/answer")


def markup_elements(page: Page) -> int:
    """Elements in <main> that only a document's markup could have made."""
    return int(page.evaluate(
        "document.querySelectorAll('main script, main img, main b, main iframe, "
        "main a[href^=\"javascript\"]').length"))


# -- answered ---------------------------------------------------------------------------------


def test_an_answer_shows_its_quote_in_context_with_the_answer_marked(page: Page,
                                                                     shoot: Callable) -> None:
    ask(page, "Who did Rollo swear fealty to?")
    out = page.locator("#out")
    answer = out.locator("p.answer").inner_text()
    assert "Charles" in answer and not out.locator(".declined").count()
    mark = out.locator("blockquote mark")
    assert mark.count() == 1
    quote = mark.inner_text()
    assert len(quote) >= 20 and quote in DOCS[0].text
    assert out.locator("blockquote mark .ans").inner_text() == answer  # the answer, in its quote
    # the quote sits inside the source passage, with the document's text around it
    assert out.locator("blockquote").inner_text().replace("\u2026", "") in DOCS[0].text
    assert re.fullmatch(r"score \d\.\d{3}", out.locator(".score").inner_text())
    assert re.fullmatch(r"took \d+ ms \(retrieval \d+ ms, generation \d+ ms, scoring \d+ ms\)",
                        out.locator(".timing").inner_text())
    external = out.locator("a[target=_blank]")
    assert external.get_attribute("href") == DOCS[0].source
    assert out.locator("a[data-internal]").first.inner_text() == "Normans"
    assert out.locator("details summary").inner_text().startswith("Passages retrieval found")
    shoot(page, "answered")

    out.locator("text=Copy citation").click()
    page.wait_for_selector("#out button:has-text('Copied')")
    copied = page.evaluate("navigator.clipboard.readText()")
    lines = copied.splitlines()
    assert lines[0] == f"\u201c{answer}\u201d" and lines[1] == f"Quote: \u201c{quote}\u201d"
    assert re.fullmatch(r"Source: Normans, https://en\.wikipedia\.org/wiki/Normans, characters "
                        r"\d+-\d+ \(document normans\)", lines[2])


def contrast(a: str, b: str) -> float:
    """WCAG's contrast ratio of two CSS colours given as ``rgb(r, g, b)``."""
    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", css)[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_fields_focus_and_quotes_are_drawn_by_more_than_faint_colour(page: Page) -> None:
    """WCAG 1.4.11 and 1.4.1: the focus ring (#7aa7ff) and the fields' borders (#a9abb3) stood
    at 2.4:1 and 2.3:1 against the page, under the 3:1 asked of them; a quote in its context
    was marked by a pale yellow alone (1.14:1)."""
    white = "rgb(255, 255, 255)"
    assert contrast("rgb(0, 0, 0)", white) == pytest.approx(21)
    page.click("nav >> text=Ask")
    assert contrast(page.eval_on_selector("#q", "e => getComputedStyle(e).borderTopColor"),
                    white) >= 3
    page.focus("#q")
    page.keyboard.press("Tab")  # (a keyboard focus: :focus-visible)
    ring = page.eval_on_selector("#ask-button", "e => getComputedStyle(e).outlineColor")
    for background in (white, "rgb(253, 236, 238)", "rgb(255, 248, 232)"):  # page, error, warning
        assert contrast(ring, background) >= 3, (ring, background)
    ask(page, "Who did Rollo swear fealty to?")
    mark = page.eval_on_selector("#out blockquote mark", "e => getComputedStyle(e).outlineStyle")
    assert mark != "none"


def test_the_page_is_usable_from_the_keyboard(page: Page, base_url: str) -> None:
    assert page.get_by_label("Question", exact=True).get_attribute("id") == "q"
    assert page.get_by_label("API key", exact=True).get_attribute("id") == "key"
    page.goto(base_url + "/documents")
    page.fill("#key", KEY)
    assert page.get_by_label("Web page address", exact=True).count() == 1
    assert page.get_by_label("Text", exact=True).count() == 1
    page.click("nav >> text=Ask")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "ask-button"
    # a spinner while waiting, with the button disabled
    held: list[Any] = []
    page.route("**/v1/answer", lambda route: held.append(route))
    try:
        page.fill("#q", "When did the Eiffel Tower open?")
        page.focus("#ask-button")
        page.keyboard.press("Enter")  # the button, from the keyboard
        page.wait_for_selector("#out .spinner")
        assert page.is_disabled("#ask-button")
        # a status line tells a screen reader (the result region is no live region: it read
        # all of a result, context and passages too; and one marked busy held its news back)
        assert page.text_content("#ask-status") == "Looking for an answer\u2026"
        assert page.get_attribute("#ask-status", "role") == "status"
        wait_until_held(page, held, "the question never left the page")
        held[0].continue_()
        page.wait_for_selector("#out article")
    finally:
        page.unroute("**/v1/answer")
    assert page.is_enabled("#ask-button")
    assert page.text_content("#ask-status") == (
        "Answer: " + page.inner_text("#out p.answer") + ". Quoted from Eiffel Tower.")
    assert page.evaluate("[...document.querySelectorAll('[aria-live], [aria-busy]')]"
                         ".map(e => e.id)") == ["docs-range"]
    # the result is a region named by its heading, which a screen reader can go to
    heading = page.locator("#out article h3#result-title")
    assert heading.inner_text() == "Answer to \u201cWhen did the Eiffel Tower open?\u201d"
    assert page.get_attribute("#out article", "aria-labelledby") == "result-title"
    # disabling the button dropped the focus to <body>: it comes back when the answer does
    assert page.evaluate("document.activeElement.id") == "ask-button"


# -- declined ---------------------------------------------------------------------------------


def test_a_decline_says_why_and_shows_the_best_guess_and_the_passages(page: Page,
                                                                      shoot: Callable) -> None:
    undo = declining(page)
    try:
        ask(page, "When did the Eiffel Tower open?")
    finally:
        undo()
    out = page.locator("#out")
    assert out.locator("p.answer.declined").inner_text() == "Declined to answer"
    assert "not confident" in out.locator(".headline").inner_text()
    why = out.locator(".why").inner_text()
    assert why.startswith("Why: best score") and "below the threshold 1.000" in why
    guess = out.locator(".guess")
    assert "not confident" in guess.locator("h3").inner_text()
    assert guess.locator("p.answer").inner_text()
    assert guess.locator("blockquote mark").inner_text() in DOCS[1].text
    assert re.fullmatch(r"score \d\.\d{3}", guess.locator(".score").inner_text())
    assert page.text_content("#ask-status") == "Declined to answer: " + why[len("Why: "):] + "."
    hits = out.locator("details[open] ol.hits li")
    assert hits.count() >= 1 and "Eiffel" in out.locator("details").inner_text()
    assert out.locator("text=Copy citation").count() == 0  # a guess is not a citation
    shoot(page, "declined")


# -- errors -----------------------------------------------------------------------------------


def test_an_error_is_shown_in_words(page: Page, shoot: Callable) -> None:
    page.fill("#key", "")
    try:
        page.click("nav >> text=Ask")
        page.fill("#q", "Who did Rollo swear fealty to?")
        page.press("#q", "Enter")
        error = page.wait_for_selector("#out .error[role=alert]")
        text = error.inner_text()
        assert text.startswith("Could not answer: This service needs an API key: type it in")
        assert "Bearer" not in text  # the API's advice is for programs, not for this page
        shoot(page, "error")
        # the field the error is about says so, and is described by it, until the next try
        assert page.get_attribute("#key", "aria-invalid") == "true"
        assert page.get_attribute("#key", "aria-describedby") == "key-error"
        assert page.get_attribute("#out .error", "id") == "key-error"
        assert page.text_content("#ask-status") == ""  # (the alert speaks for itself)
        page.fill("#key", "not-the-key")
        page.press("#q", "Enter")
        page.wait_for_selector("#out .error >> text=did not accept this API key")
    finally:
        page.fill("#key", KEY)
    page.fill("#q", "   ")  # the API's 422: about the question
    page.press("#q", "Enter")
    page.wait_for_selector("#out .error >> text=whitespace")
    assert page.get_attribute("#key", "aria-invalid") is None
    assert page.get_attribute("#key", "aria-describedby") is None
    assert page.get_attribute("#q", "aria-invalid") == "true"
    assert page.get_attribute("#q", "aria-describedby") == "q-hint q-error"
    ask(page, "Who did Rollo swear fealty to?")
    assert page.get_attribute("#q", "aria-invalid") is None
    assert page.get_attribute("#q", "aria-describedby") == "q-hint"


def test_an_error_marks_its_own_field_and_no_other(page: Page) -> None:
    """Sending one form unmarked every field (an add cleared the question's mark while its
    error stood), and an old error kept its id: two elements were "key-error", and the key
    field was described by the stale one."""
    refused = json.dumps({"error": {"code": "unauthorized", "message": "bad key",
                                    "details": None}})

    def refuse(route: Any) -> None:
        if route.request.method == "POST":
            route.fulfill(status=401, body=refused, content_type="application/json")
        else:
            route.continue_()

    page.click("nav >> text=Ask")
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    page.wait_for_selector("#out .error >> text=whitespace")
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    page.route("**/v1/documents", refuse)
    page.route("**/v1/answer", refuse)
    try:
        page.fill("#add-body", "Barn owls hunt by sound alone.")
        page.click("#add-text button[type=submit]")
        page.wait_for_selector("#add-status .error >> text=did not accept this API key")
        assert page.locator("[id=key-error]").count() == 1
        assert page.get_attribute("#key", "aria-describedby") == "key-error"
        assert page.inner_text("#key-error").startswith("Could not add the document")
        assert page.get_attribute("#q", "aria-invalid") == "true"  # the ask view's error stands
        page.click("nav >> text=Ask")
        page.fill("#q", "Who did Rollo swear fealty to?")
        page.press("#q", "Enter")
        page.wait_for_selector("#out .error >> text=did not accept this API key")
        assert page.locator("[id=key-error]").count() == 1
        assert page.inner_text("#key-error").startswith("Could not answer")
        assert page.get_attribute("#q", "aria-invalid") is None
        assert page.get_attribute("#q", "aria-describedby") == "q-hint"
    finally:
        page.unroute("**/v1/documents")
        page.unroute("**/v1/answer")


def test_a_busy_service_is_asked_again_after_the_wait_it_names(page: Page) -> None:
    busy = json.dumps({"error": {"code": "overloaded", "message": "too many questions queued",
                                 "details": None}})
    calls: list[int] = []

    def turned_away(times: int) -> Callable[[Any], None]:
        def handle(route: Any) -> None:
            calls.append(1)
            if len(calls) <= times:
                route.fulfill(status=503, body=busy, content_type="application/json",
                              headers={"Retry-After": "1"})
            else:
                route.continue_()
        return handle

    page.route("**/v1/answer", turned_away(1))
    try:
        ask(page, "When did the Eiffel Tower open?")  # turned away once, then answered
        assert len(calls) == 2 and page.locator("#out .answer").count() == 1
        calls.clear()
        page.unroute("**/v1/answer")
        page.route("**/v1/answer", turned_away(99))  # still busy after the tries: say so
        page.fill("#q", "When did the Eiffel Tower open?")
        page.press("#q", "Enter")
        error = page.wait_for_selector("#out .error[role=alert]", timeout=15_000)
        assert "too many questions queued (try again in 1 second)" in error.inner_text()
        assert len(calls) == 3  # the first try and two more
    finally:
        page.unroute("**/v1/answer")


def test_the_document_list_can_be_tried_again_after_an_error(page: Page) -> None:
    """After a 401 the list said to type the key and try again, with nothing to try with."""
    page.fill("#key", "")
    try:
        page.click("nav >> text=Documents")
        page.wait_for_selector("#docs-status .error >> text=needs an API key")
    finally:
        page.fill("#key", KEY)
    page.get_by_role("button", name="Try again").click()  # (the message says "try again")
    page.wait_for_selector("#docs-range >> text=Showing 1")
    assert page.locator("#docs-status .error").count() == 0


def test_a_key_no_header_can_carry_is_said_to_be_wrong_not_an_unreachable_service(
        page: Page) -> None:
    page.fill("#key", "sekret\u2019key")
    try:
        page.click("nav >> text=Ask")
        page.fill("#q", "Who did Rollo swear fealty to?")
        page.press("#q", "Enter")
        error = page.wait_for_selector("#out .error[role=alert]").inner_text()
        assert "the API key holds a character no key has" in error
        assert "cannot be reached" not in error
    finally:
        page.fill("#key", KEY)


def test_the_api_key_survives_a_reload_but_not_the_tab(browser: Any, base_url: str) -> None:
    page, errors = open_page(browser, base_url, VIEWPORT)  # types the key in
    try:
        page.reload()
        assert page.input_value("#key") == KEY
        page.fill("#key", "")
        page.reload()
        assert page.input_value("#key") == ""
        page.fill("#key", KEY)
    finally:
        page.context.close()
    assert errors == [], errors
    context = browser.new_context(viewport=VIEWPORT)  # another session: nothing was kept for it
    try:
        other = context.new_page()
        other.goto(base_url + "/")
        assert other.input_value("#key") == ""
    finally:
        context.close()


# -- the document view ------------------------------------------------------------------------


def test_a_quote_opens_its_document_highlighted_and_scrolled_into_view(
        page: Page, base_url: str, shoot: Callable) -> None:
    ask(page, "Who first lit the harbour lighthouse?")
    out = page.locator("#out")
    quote = out.locator("blockquote mark").inner_text()
    assert "Trelawny" in quote
    # its context: the document's characters before it (cut, so marked "…"), read from the
    # document without making all of it an array
    shown = out.locator("blockquote").inner_text()
    assert shown.startswith("\u2026") and not shown.endswith("\u2026")
    before = shown[1:shown.index(quote)]
    assert len(before) == 300 and HARBOUR_TEXT.index(quote) >= 300
    assert HARBOUR_TEXT[:HARBOUR_TEXT.index(quote)].endswith(before)
    answer = out.locator("p.answer").inner_text()
    out.locator("a[data-internal]", has_text="Harbour log").first.click()
    page.wait_for_selector("#doc-body .doctext mark")
    assert page.url.startswith(base_url + "/document?id=harbour&start=")
    assert page.locator("#doc-title").inner_text() == "Harbour log"
    assert page.evaluate("document.activeElement.id") == "doc-title"
    text = page.locator("#doc-body .doctext").inner_text()
    assert text == HARBOUR_TEXT.rstrip("\n") or text == HARBOUR_TEXT
    mark = page.locator("#doc-body mark")
    assert "first lit in 1783" in mark.inner_text()
    assert mark.locator(".ans").inner_text() == answer
    # the text box scrolled to the quote (the title stays in view above it)
    assert page.locator("#doc-body .doctext").evaluate("e => e.scrollTop") > 0
    box, frame = mark.bounding_box(), page.locator("#doc-body .doctext").bounding_box()
    assert box is not None and frame is not None
    assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]
    assert box["y"] + box["height"] <= VIEWPORT["height"]
    assert "Highlighted: the quote" in page.locator("#doc-meta").inner_text()
    shoot(page, "document", full_page=False)
    page.go_back()  # the answer is still there
    page.wait_for_selector("#ask-view:not([hidden])")
    assert page.locator("#out p.answer").inner_text() == answer
    # the page's own Back button returns there too, with the focus on the question
    out.locator("a[data-internal]", has_text="Harbour log").first.click()
    page.wait_for_selector("#doc-view:not([hidden])")
    page.click("#doc-back")
    page.wait_for_selector("#ask-view:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "q"
    assert page.locator("#out p.answer").inner_text() == answer


def test_offsets_count_characters_as_the_api_does_past_an_emoji(page: Page,
                                                                  base_url: str) -> None:
    ask(page, "Which cheese does Cedric Vasseur prefer?")
    out = page.locator("#out")
    answer = out.locator("p.answer").inner_text()
    quote = out.locator("blockquote mark").inner_text()
    assert "Reblochon" in quote and quote in CHEESE_TEXT
    assert out.locator("blockquote mark .ans").inner_text() == answer
    # shown in its document's context, not as the quote alone
    assert "Emoji first" in out.locator("blockquote").inner_text()
    out.locator("a[data-internal]", has_text="Cheese notes").first.click()
    page.wait_for_selector("#doc-body .doctext mark")
    assert page.locator("#doc-body mark").inner_text() == quote
    assert page.locator("#doc-body mark .ans").inner_text() == answer
    assert f"{len(CHEESE_TEXT)} characters" in page.locator("#doc-meta").inner_text()
    page.click("#doc-back")
    page.wait_for_selector("#ask-view:not([hidden])")


def test_line_breaks_css_shows_as_spaces_are_drawn_as_line_breaks(page: Page,
                                                                  base_url: str) -> None:
    """A document whose lines end in a lone CR (as old Macs wrote them) or U+2028 showed as
    one run-on line (CSS reads those as spaces); they are drawn as line breaks, one character
    for one, so the highlight still covers the offsets' characters."""
    text = "Tide table\r\rHigh water at noon.\rLow water at six.\u2028Slack between.\r\nEnd."
    auth = {"Authorization": f"Bearer {KEY}"}
    added = httpx.post(base_url + "/v1/documents", headers=auth, timeout=30,
                       json={"doc_id": "tides", "title": "Tides", "text": text})
    assert added.status_code in (200, 201), added.text
    try:
        start, end = text.index("Low"), text.index("Slack") + len("Slack")
        page.goto(f"{base_url}/document?id=tides&start={start}&end={end}")
        page.wait_for_selector("#doc-body mark")
        drawn = page.locator("#doc-body .doctext").evaluate("e => e.textContent")
        assert drawn == ("Tide table\n\nHigh water at noon.\nLow water at six.\nSlack "
                         "between.\r\nEnd.")
        mark = page.locator("#doc-body mark")
        assert mark.evaluate("e => e.textContent") == "Low water at six.\nSlack"
        assert mark.evaluate("e => e.getClientRects().length") == 2  # on two lines
        heights = page.evaluate("""() => {
          const div = document.createElement("div");
          div.className = "doctext";
          document.body.append(div);
          const h = t => { div.textContent = t; return div.getBoundingClientRect().height; };
          const out = [h("a"), h("a\\nb")];
          div.remove();
          return out;
        }""")
        box = page.locator("#doc-body .doctext").evaluate(
            "e => e.scrollHeight - parseFloat(getComputedStyle(e).paddingTop) "
            "- parseFloat(getComputedStyle(e).paddingBottom)")
        line = heights[1] - heights[0]
        assert box == pytest.approx(6 * line, abs=line / 2)  # six lines, the blank one too
    finally:
        httpx.delete(base_url + "/v1/documents/tides", headers=auth, timeout=30)


def test_a_link_to_text_the_document_no_longer_holds_highlights_nothing(
        page: Page, base_url: str) -> None:
    """A quote given before its document was replaced (or a hand-made address) highlighted
    whatever stood at its offsets now, labelled as the quote."""
    ask(page, "Which cheese does Cedric Vasseur prefer?")
    link = page.locator("#out a[data-internal]", has_text="Cheese notes").first
    href = link.get_attribute("href")
    assert href is not None and "&h=" in href and "what=quote" in href
    stale = re.sub(r"h=[0-9a-f]{8}", "h=00000000", href)
    page.goto(base_url + stale)  # (the tab keeps the key)
    page.wait_for_selector("#doc-meta .stale")
    assert "has changed since the link was made" in page.locator("#doc-meta").inner_text()
    assert page.locator("#doc-body mark").count() == 0
    bare = re.sub(r"&h=[0-9a-f]{8}&what=quote", "", href)  # hand-made: said to be unchecked
    page.goto(base_url + bare)
    page.wait_for_selector("#doc-body mark")
    assert "(as the address asks)" in page.locator("#doc-meta").inner_text()
    # a hand-made range the document cannot have: said so (the text came with no word)
    for wrong in ("start=5&end=99999", "start=20&end=10", "start=x&end=3"):
        page.goto(f"{base_url}/document?id=cheese&{wrong}")
        page.wait_for_selector("#doc-meta .stale")
        said = page.locator("#doc-meta .stale").inner_text()
        assert said.startswith("Nothing is highlighted: start=") and "characters" in said, said
        assert page.locator("#doc-body mark").count() == 0


def test_an_unknown_document_is_a_message_not_a_blank_page(page: Page, base_url: str) -> None:
    page.goto(base_url + "/document?id=no-such-doc")
    page.fill("#key", KEY)
    page.click("#doc-body button:has-text('Try again')")
    page.wait_for_selector("#doc-body .error >> text=no document with id", timeout=5000)
    assert page.locator("#doc-body .error").inner_text() == "no document with id 'no-such-doc'"
    assert page.locator("#doc-title").inner_text() == "Document not shown"
    assert page.title() == "Document not shown \u2014 citeqa"


# -- the document list, add, delete -----------------------------------------------------------


def test_the_document_list_pages_through_the_index(page: Page, shoot: Callable) -> None:
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    assert page.locator("nav a[aria-current=page]").inner_text() == "Documents"
    assert page.locator("#docs-range").inner_text() == f"Showing 1\u201320 of {len(DOCS)}"
    rows = page.locator("#docs-list li.doc")
    assert rows.count() == 20
    first = rows.nth(0).inner_text()
    assert "Normans" in first and f"{len(DOCS[0].text)} characters" in first
    assert "https://en.wikipedia.org/wiki/Normans" in first
    assert page.is_disabled("#docs-prev") and page.is_enabled("#docs-next")
    shoot(page, "documents", full_page=False)
    page.click("#docs-next")
    page.wait_for_selector(f"#docs-range >> text=Showing 21\u2013{len(DOCS)} of {len(DOCS)}")
    assert rows.count() == len(DOCS) - 20 and page.is_disabled("#docs-next")
    page.click("#docs-prev")
    page.wait_for_selector("#docs-range >> text=Showing 1\u201320")


def test_a_read_key_is_offered_no_add_or_delete(browser: Any, base_url: str,
                                                shoot: Callable) -> None:
    """The page offered a read key the add forms and Delete buttons, which the service then
    refused (403); it now shows what the key may do, and offers them again for a key that may."""
    page, errors = open_page(browser, base_url, VIEWPORT, "/", key=READ_KEY)
    try:
        page.click("nav >> text=Documents")
        page.wait_for_selector("#docs-list li.doc a")
        assert page.locator("#docs-list li.doc").count() == 20  # reading is allowed
        assert page.locator("#docs-list button", has_text="Delete").count() == 0
        assert page.is_hidden("#add-text") and page.is_hidden("#add-url")
        assert "may ask, search and read documents" in page.inner_text("#read-only")
        shoot(page, "documents-read-key", full_page=False)
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")  # what leaving the field after typing fires
        page.wait_for_selector("#docs-list button >> text=Delete")
        assert page.is_visible("#add-text") and page.is_hidden("#read-only")
    finally:
        page.context.close()
    assert errors == [], errors


def test_adding_documents_by_text_and_by_url(page: Page, shoot: Callable) -> None:
    page.click("nav >> text=Documents")
    page.fill("#add-title", "Quokka facts")
    page.fill("#add-source", "notes/quokka.txt")
    page.fill("#add-body", "Quokkas live on Rottnest Island and eat the leaves of shrubs.")
    page.click("#add-text button[type=submit]")
    status = page.wait_for_selector("#add-status .ok")
    assert status.inner_text().startswith("Added \u201cQuokka facts\u201d (1 passage)")
    assert page.input_value("#add-body") == ""  # the form is cleared for the next one
    page.wait_for_selector(f"#docs-range >> text=of {len(DOCS) + 1}")
    shoot(page, "added", full_page=False)

    # the same text again is the same document: the API's 409, in words
    page.fill("#add-title", "Quokka facts")
    page.fill("#add-source", "notes/quokka.txt")
    page.fill("#add-body", "Quokkas live on Rottnest Island and eat the leaves of shrubs.")
    page.click("#add-text button[type=submit]")
    error = page.wait_for_selector("#add-status .error")
    assert "is already indexed, as document" in error.inner_text()

    page.fill("#url", "https://example.org/missing")  # a 404: about the address
    page.click("#add-url button[type=submit]")
    page.wait_for_selector("#add-status .error >> text=HTTP 404")  # (a 502: fetch_failed)
    assert page.get_attribute("#url", "aria-invalid") == "true"
    assert page.get_attribute("#url", "aria-describedby") == "url-error"
    assert page.get_attribute("#add-body", "aria-invalid") is None
    page.fill("#url", "https://example.org/moths")
    page.click("#add-url button[type=submit]")
    status = page.wait_for_selector("#add-status .ok")
    assert page.get_attribute("#url", "aria-invalid") is None
    assert "Glimmer moths" in status.inner_text()
    page.click("#add-status >> text=Open it")
    page.wait_for_selector("#doc-body .doctext")
    # the document's text scrolls: a named region the keyboard can reach
    text = page.locator("#doc-body .doctext")
    assert (text.get_attribute("role"), text.get_attribute("aria-label"),
            text.get_attribute("tabindex")) == ("region", "Document text", "0")
    assert "<polarised> moonlight" in page.locator("#doc-body").inner_text()
    ask(page, "Where do quokkas live?")
    assert page.locator("#out a[data-internal]").first.inner_text() == "Quokka facts"


def test_what_is_typed_while_a_document_is_added_stays_and_urls_are_encoded(
        page: Page) -> None:
    """form.reset() after an add wiped the next document typed meanwhile; an accented URL was
    sent as typed and refused (422: write it in %XX)."""
    page.click("nav >> text=Documents")
    held: list[Any] = []
    page.route("**/v1/documents", lambda route: held.append(route)
               if route.request.method == "POST" else route.continue_())
    try:
        page.fill("#add-title", "Wombat facts")
        page.fill("#add-body", "Wombats dig burrows with their strong claws.")
        page.click("#add-text button[type=submit]")
        wait_until_held(page, held, "the document never left the page")
        page.fill("#add-title", "Numbat facts")  # the next one, typed while the first is added
        held.pop().continue_()
        page.wait_for_selector("#add-status .ok >> text=Wombat facts")
        assert page.input_value("#add-title") == "Numbat facts"  # not wiped

        page.fill("#url", "https://example.org/C\u00f4te d\u2019Ivoire")
        page.click("#add-url button[type=submit]")
        wait_until_held(page, held, "the address never left the page")
        assert json.loads(held[0].request.post_data)["url"] == \
            "https://example.org/C%C3%B4te%20d%E2%80%99Ivoire"
        held.pop().fulfill(status=404, json={"error": {"code": "fetch_failed", "message": "no"}})
        page.wait_for_selector("#add-status .error")
    finally:
        page.unroute("**/v1/documents")
        page.fill("#add-title", "")


def test_a_slow_document_does_not_replace_the_one_asked_for_after_it(page: Page) -> None:
    """Opened, left with Back, another opened: the first, answering last, was shown under the
    second's address."""
    held: list[Any] = []
    page.route("**/v1/documents/cheese", lambda route: held.append(route))
    try:
        page.click("nav >> text=Documents")
        page.click("#docs-list a >> text=Cheese notes")
        wait_until_held(page, held, "the document was never asked for")
        page.go_back()
        page.click('#docs-list a >> text="Catalogue note 1"')
        page.wait_for_selector('#doc-title >> text="Catalogue note 1"')
        held.pop().continue_()  # the cheese notes answer late, after the reader moved on
        page.wait_for_timeout(500)
        assert page.locator("#doc-title").inner_text() == "Catalogue note 1"
        assert "Cheese" not in page.title()
    finally:
        page.unroute("**/v1/documents/cheese")


def test_the_pager_keeps_focus_on_the_first_and_last_page(page: Page) -> None:
    """Enter on "Next" reaching the last page disabled the button that had focus: it fell to
    the page's start; and the new range was not announced."""
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-range >> text=Showing 1")
    assert page.get_attribute("#docs-range", "aria-live") == "polite"
    page.focus("#docs-next")
    page.keyboard.press("Enter")
    page.wait_for_selector("#docs-range >> text=Showing 21")  # (earlier tests add some)
    assert page.evaluate("document.activeElement.id") == "docs-prev"
    page.keyboard.press("Enter")
    page.wait_for_selector("#docs-range >> text=Showing 1\u201320")
    assert page.evaluate("document.activeElement.id") == "docs-next"


def test_the_documents_view_forgets_its_old_notes_and_hides_what_a_failed_listing_leaves_unknown(
        page: Page) -> None:
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    page.evaluate("""() => {
        document.getElementById('docs-status').textContent = 'Deleted something long ago.';
        document.getElementById('add-status').textContent = 'An old add error.'; }""")
    page.click("nav >> text=Ask")
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    assert page.inner_text("#docs-status") == "" and page.inner_text("#add-status") == ""
    page.fill("#key", "")  # the listing fails: neither the forms nor the read-only note
    try:
        page.click("nav >> text=Ask")
        page.click("nav >> text=Documents")
        page.wait_for_selector("#docs-status .error >> text=needs an API key")
        assert page.is_hidden("#add-text") and page.is_hidden("#read-only")
    finally:
        page.fill("#key", KEY)


def test_deleting_a_document_asks_first(page: Page, shoot: Callable) -> None:
    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    page.click("#docs-next")
    page.wait_for_selector("#docs-range >> text=Showing 21")
    row = page.locator("#docs-list li.doc", has_text="Quokka facts")
    row.locator("button", has_text="Delete").click()
    confirm = row.locator(".confirm")
    assert confirm.inner_text().startswith("Delete \u201cQuokka facts\u201d from the index?")
    assert page.evaluate("document.activeElement.textContent") == "Delete it"
    shoot(page, "delete", full_page=False)
    confirm.locator("text=Cancel").click()
    assert row.locator(".confirm").count() == 0
    row.locator("button", has_text="Delete").click()
    held: list[Any] = []  # the deletion under way: it can no longer be cancelled (Cancel
    page.route("**/v1/documents/**", lambda route: held.append(route)  # closed the box and
               if route.request.method == "DELETE" else route.continue_())  # it went on)
    try:
        row.locator("text=Delete it").click()
        wait_until_held(page, held, "the deletion never left the page")
        assert confirm.locator("button", has_text="Cancel").is_disabled()
        assert confirm.locator("button", has_text="Deleting").is_disabled()
        held.pop().continue_()
    finally:
        page.unroute("**/v1/documents/**")
    page.wait_for_selector("#docs-status >> text=Deleted \u201cQuokka facts\u201d from the index.")
    assert page.locator("#docs-list li.doc", has_text="Quokka facts").count() == 0
    page.click("nav >> text=Ask")
    ask(page, "Where do quokkas live?")
    assert "Quokka" not in page.locator("#out").inner_text()


# -- untrusted documents ----------------------------------------------------------------------


def test_a_documents_markup_is_text_in_every_view(page: Page, shoot: Callable) -> None:
    """The evil document's title, source and text (script, img with onerror, javascript: link)
    go through the answer, the decline, the document, the list, add and delete: shown as
    text, never run (the page fixture checks window.__pwned and the console at the end)."""
    ask(page, "What is the moat of Castle Grimwald filled with?")
    out = page.locator("#out")
    assert "<b>silver eels</b>" in out.locator("blockquote").inner_text()
    assert EVIL_TITLE in out.inner_text()
    assert "javascript:window.__pwned='source'" in out.inner_text()  # as text, not a link
    undo = declining(page)
    try:
        ask(page, "What is the moat of Castle Grimwald filled with?")
    finally:
        undo()
    assert "<b>silver eels</b>" in out.locator(".guess").inner_text()
    assert "<script>" in out.locator("details").inner_text()
    assert markup_elements(page) == 0
    out.locator(".guess a[data-internal]").first.click()
    page.wait_for_selector("#doc-body mark")
    assert page.locator("#doc-title").inner_text() == EVIL_TITLE
    assert page.locator("#doc-body .doctext").inner_text() == EVIL_TEXT
    assert markup_elements(page) == 0
    shoot(page, "untrusted", full_page=False)

    page.click("nav >> text=Documents")
    page.wait_for_selector("#docs-list li.doc a")
    assert EVIL_TITLE in page.locator("#docs-list").inner_text()
    page.fill("#add-title", EVIL_TITLE + " copy")
    page.fill("#add-body", EVIL_TEXT)
    page.click("#add-text button[type=submit]")
    assert EVIL_TITLE in page.wait_for_selector("#add-status .ok").inner_text()
    page.click("#docs-next")
    page.wait_for_selector("#docs-range >> text=Showing 21")
    row = page.locator("#docs-list li.doc", has_text=EVIL_TITLE + " copy")
    row.locator("button", has_text="Delete").click()
    assert EVIL_TITLE in row.locator(".confirm").inner_text()
    row.locator("text=Delete it").click()
    page.wait_for_selector("#docs-status .ok")
    assert markup_elements(page) == 0
    assert page.evaluate("window.__pwned") is None


# -- a narrow screen --------------------------------------------------------------------------


def test_a_narrow_screen_stacks_the_layout_without_sideways_scrolling(
        browser: Any, base_url: str, shoot: Callable) -> None:
    page, errors = open_page(browser, base_url, {"width": 380, "height": 760})
    try:
        ask(page, "Who did Rollo swear fealty to?")
        q, button = page.locator("#q").bounding_box(), page.locator("#ask-button").bounding_box()
        assert q is not None and button is not None
        assert button["y"] >= q["y"] + q["height"]  # the button goes under the input
        assert page.evaluate("document.documentElement.scrollWidth") <= 380
        shoot(page, "narrow")
        page.click("nav >> text=Documents")
        page.wait_for_selector("#docs-list li.doc a")
        assert page.evaluate("document.documentElement.scrollWidth") <= 380
        assert errors == []
    finally:
        page.context.close()


def test_direction_controls_blank_titles_and_long_notes_keep_to_their_place(
        browser: Any, base_url: str) -> None:
    """A title with U+202E reversed the page's own words around it ("Delete “invoice?xedni
    eht morf”"); a title of a zero-width space was an invisible, unclickable link; a long
    title's note widened a phone's page."""
    page, errors = open_page(browser, base_url, {"width": 380, "height": 760})
    reversing = "invoice\u202etxt.exe"
    long_title = "Supercalifragilistic" * 12
    try:
        page.click("nav >> text=Documents")
        page.wait_for_selector("#docs-list li.doc a")
        added = []
        for title, body in ((reversing, "Ledgers of the Vexmoor invoices."),
                            ("\u200b", "Wrenfield almanac\nIt lists the tides."),
                            (long_title, "Notes on the long-titled subject.")):
            page.fill("#add-title", title)
            page.fill("#add-source", "https://example.org/\u202eabc")
            page.fill("#add-body", body)
            page.click("#add-text button[type=submit]")
            note = page.wait_for_selector("#add-status .ok")
            added.append(note.query_selector("bdi").inner_text())
            assert page.evaluate("document.documentElement.scrollWidth") <= 380, title
        # the reversing title is set apart in the note, the list, the link and the question
        assert added == [reversing, "Wrenfield almanac", long_title]  # blank: the default
        page.click("#docs-next")
        page.wait_for_selector("#docs-range >> text=Showing 21")
        for title in (reversing, "Wrenfield almanac", long_title):
            row = page.locator("#docs-list li.doc", has=page.locator(f"a:text-is('{title}')"))
            link = row.locator("p.title a")
            assert link.evaluate("a => getComputedStyle(a).unicodeBidi") == "isolate"
            assert row.locator(".small bdi").inner_text() == link.get_attribute(
                "href").split("id=")[1].split("&")[0]  # the doc_id, set apart
            label = "\u2068" + title + "\u2069" if title == reversing else title
            assert row.locator("button", has_text="Delete").get_attribute(
                "aria-label") == "Delete " + label  # isolated where it holds a control
            row.locator("button", has_text="Delete").click()
            assert row.locator(".confirm bdi").inner_text() == title
            page.evaluate("document.getElementById('docs-status').replaceChildren()")
            row.locator("text=Delete it").click()
            done = page.wait_for_selector("#docs-status .ok")
            assert done.query_selector("bdi").inner_text() == title
            assert page.evaluate("document.documentElement.scrollWidth") <= 380, title
            if title != long_title:
                page.wait_for_selector("#docs-list li.doc a")
                if page.locator("#docs-next").is_enabled():
                    page.click("#docs-next")
                    page.wait_for_selector("#docs-range >> text=Showing 21")
        assert errors == []
    finally:
        page.context.close()
