"""The chat page in a real browser: Python Playwright driving Debian's Chromium against ``python app.py``.

Needs `apt-get install -y chromium fonts-noto-cjk` (no `playwright install`: the system Chromium is used).
Run: python -m pytest -m browser tests/app/test_browser.py
It runs against ``rambling_app`` (see conftest), whose greedy replies are long enough to stop. The app log
is the ground truth the tests wait on, never a fixed time: a reply's first line tells which page session it
belongs to and the sampling values the page really sent; its last line when it ended and why ("finish abort"
= the engine stopped it).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

import app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPLY_STARTED_LOG = (
    r"reply (page-\w+): sampling GenerationParams\(max_new_tokens=(\d+), temperature=[\d.]+, top_p=[\d.]+, "
    r"top_k=(\d+), do_sample=\w+\)"
)
REPLY_ENDED_LOG = r"reply {session}: prompt \d+ tok, completion (\d+) tok, dropped \d+ msgs, finish (\w+)"
LONG_PROMPT = "Tell me a very long story about the sea."
TIMEOUT_MS = 60_000
SHORT, LONG = 64, 2048  # max new tokens: a reply that ends by itself soon, and one long enough to stop
QUIET_S = 1.5  # after a stopped reply has ended: how long the page must then stay unchanged
ANY_MESSAGE = '#chatbot [data-testid="user"], #chatbot [data-testid="bot"]'


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium fonts-noto-cjk")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def open_page(browser: Browser, url: str, errors: list[str]) -> Page:
    """A fresh page (its own Gradio session) on the chat, ready for input."""
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#msg textarea")
    page.get_by_text("Advanced options").click()
    expect(slider(page, "Top-k")).to_be_visible()
    return page


def set_options(page: Page, options: dict[str, int]) -> None:
    """Type values into sliders' number boxes until every slider holds its value (what an event sends).

    Two races lose a typed value: the box hands it to the slider only when it loses focus, a moment later,
    and a page still settling after load can put a slider back to its default (seen under load: Top-k back
    at 40 while Max new tokens, typed after it, kept its value). So the values are typed again until all of
    them hold at once; the reply's log line then shows what the engine really got.

    Args:
        page: the chat page, its advanced options open.
        options: slider label -> value.
    """
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        for label, value in options.items():
            if slider(page, label).input_value() != str(value):
                box = page.locator(f'input[aria-label="number input for {label}"]')
                box.fill(str(value))
                box.press("Tab")
        try:
            for label, value in options.items():
                expect(slider(page, label)).to_have_value(str(value), timeout=2_000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def slider(page: Page, label: str) -> Locator:
    return page.locator(f'[data-testid="range-input"][aria-label="range slider for {label}"]')


OPTIONS: dict[Page, dict[str, int]] = {}  # page -> the options its tests rely on (checked again on each send)


def greedy(page: Page, max_new_tokens: int) -> None:
    """top_k=1 always takes the likeliest token: replies are deterministic."""
    OPTIONS[page] = {"Top-k": 1, "Max new tokens": max_new_tokens}
    set_options(page, OPTIONS[page])


def messages(page: Page, role: str) -> list[str]:
    return page.locator(f'#chatbot [data-testid="{role}"]').all_inner_texts()


def send(page: Page, text: str) -> None:
    set_options(page, OPTIONS.get(page, {}))  # still in place: typed again if the page lost one
    textbox = page.locator("#msg textarea")
    textbox.fill(text)
    textbox.press("Enter")


def wait_until_streaming(page: Page, bots: int) -> None:
    """Wait until the page shows ``bots`` answers, the last one with some text."""
    page.wait_for_function(
        """n => { const b = document.querySelectorAll('#chatbot [data-testid="bot"]');
                  return b.length === n && b[n - 1].innerText.trim().length > 0; }""",
        arg=bots,
    )


def wait_until_settled(page: Page) -> None:
    """Wait until the page shows no pending event and the last answer stops changing."""
    page.wait_for_function("() => document.querySelectorAll('.generating, .pending').length === 0")
    before = None
    while (now := messages(page, "bot")) != before:
        before = now
        time.sleep(0.3)


@dataclass(frozen=True)
class Reply:
    """A reply the app started, as its log tells: the page session and the sampling values it got."""

    session: str
    max_new_tokens: int
    top_k: int
    logged_at: int  # log offset of its first line: its last line comes after


def reply_started(app_server, offset: int) -> Reply:
    """Wait for the first reply the app starts past log offset ``offset``; return what it was asked for."""
    started = app_server.wait_for_log(REPLY_STARTED_LOG, after=offset)
    return Reply(
        session=started.group(1),
        max_new_tokens=int(started.group(2)),
        top_k=int(started.group(3)),
        logged_at=started.end(),
    )


def greedy_reply_started(app_server, offset: int, max_new_tokens: int) -> Reply:
    """``reply_started``, checking that the page's greedy options really reached the engine."""
    reply = reply_started(app_server, offset)
    assert (reply.top_k, reply.max_new_tokens) == (1, max_new_tokens), reply
    return reply


def wait_for_reply(app_server, page: Page, reply: Reply) -> tuple[int, str]:
    """Wait for ``reply`` to end (per the app log) and the page to settle; return (tokens, finish)."""
    finished = app_server.wait_for_log(REPLY_ENDED_LOG.format(session=reply.session), after=reply.logged_at)
    wait_until_settled(page)
    return int(finished.group(1)), finished.group(2)


def has_ended(app_server, reply: Reply) -> bool:
    """Whether the app has logged the end of ``reply``."""
    ended = re.compile(REPLY_ENDED_LOG.format(session=reply.session))
    return ended.search(app_server.log(), reply.logged_at) is not None


def test_send_stop_retry_undo_clear(browser: Browser, rambling_app, tmp_path: Path) -> None:
    app_server = rambling_app
    errors: list[str] = []
    page = open_page(browser, app_server.url, errors)
    textbox = page.locator("#msg textarea")
    greedy(page, SHORT)

    # Shift+Enter adds a line, Enter sends.
    textbox.fill("第一行")
    textbox.press("Shift+Enter")
    textbox.press_sequentially("第二行")
    assert textbox.input_value() == "第一行\n第二行"
    assert messages(page, "user") == []
    offset = len(app_server.log())
    send(page, "你是谁？")
    reply = greedy_reply_started(app_server, offset, SHORT)
    _, finish = wait_for_reply(app_server, page, reply)
    assert finish in ("stop", "length")
    assert messages(page, "user") == ["你是谁？"]
    assert textbox.input_value() == ""
    (first_answer,) = messages(page, "bot")

    # Retry generates the last answer again (the same one: decoding is greedy).
    offset = len(app_server.log())
    set_options(page, OPTIONS[page])
    page.click("#retry")
    retried = greedy_reply_started(app_server, offset, SHORT)
    assert retried.session == reply.session
    wait_for_reply(app_server, page, retried)
    assert messages(page, "user") == ["你是谁？"]
    assert messages(page, "bot") == [first_answer]

    # The Send button sends too.
    offset = len(app_server.log())
    textbox.fill("你可以做什么？")
    set_options(page, OPTIONS[page])
    page.click("#send")
    _, finish = wait_for_reply(app_server, page, greedy_reply_started(app_server, offset, SHORT))
    assert finish in ("stop", "length")
    assert messages(page, "user") == ["你是谁？", "你可以做什么？"]
    assert len(messages(page, "bot")) == 2 and textbox.input_value() == ""
    page.click("#undo")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 1")
    textbox.fill("")

    # Stop ends a long answer in the engine, not only on screen.
    greedy(page, LONG)
    offset = len(app_server.log())
    send(page, LONG_PROMPT)
    long_reply = greedy_reply_started(app_server, offset, LONG)
    wait_until_streaming(page, bots=2)
    page.click("#stop")
    tokens, finish = wait_for_reply(app_server, page, long_reply)
    assert finish == "abort"
    assert tokens < LONG
    stopped_answer = messages(page, "bot")[-1]
    time.sleep(QUIET_S)
    assert messages(page, "bot")[-1] == stopped_answer

    # The app still answers after a Stop.
    greedy(page, SHORT)
    offset = len(app_server.log())
    send(page, "你是谁？")
    _, finish = wait_for_reply(app_server, page, greedy_reply_started(app_server, offset, SHORT))
    assert finish in ("stop", "length")
    assert messages(page, "user") == ["你是谁？", LONG_PROMPT, "你是谁？"]
    assert len(messages(page, "bot")) == 3
    page.screenshot(path=tmp_path / "chat.png", full_page=True)

    # Undo while a long answer streams: the turn goes, the engine stops, and no late text brings it back.
    greedy(page, LONG)
    offset = len(app_server.log())
    send(page, LONG_PROMPT)
    long_reply = greedy_reply_started(app_server, offset, LONG)
    wait_until_streaming(page, bots=4)
    page.click("#undo")
    tokens, finish = wait_for_reply(app_server, page, long_reply)
    assert (finish, tokens < LONG) == ("abort", True)
    expect(textbox).to_have_value(LONG_PROMPT)
    time.sleep(QUIET_S)
    assert messages(page, "user") == ["你是谁？", LONG_PROMPT, "你是谁？"]
    assert len(messages(page, "bot")) == 3

    # Undo removes the last turn and puts its question back in the textbox.
    page.click("#undo")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 2")
    assert messages(page, "user") == ["你是谁？", LONG_PROMPT]
    assert textbox.input_value() == "你是谁？"

    # Clear while a long answer streams empties the chat for good.
    offset = len(app_server.log())
    send(page, LONG_PROMPT)
    long_reply = greedy_reply_started(app_server, offset, LONG)
    wait_until_streaming(page, bots=3)
    page.click("#clear")
    tokens, finish = wait_for_reply(app_server, page, long_reply)
    assert (finish, tokens < LONG) == ("abort", True)
    page.wait_for_function(f"() => document.querySelectorAll('{ANY_MESSAGE}').length === 0")
    time.sleep(QUIET_S)
    assert messages(page, "user") == messages(page, "bot") == []
    assert errors == []


def test_other_pages_stay_responsive_and_closing_a_tab_aborts_its_reply(
    browser: Browser, rambling_app
) -> None:
    app_server = rambling_app
    errors: list[str] = []
    busy = open_page(browser, app_server.url, errors)
    greedy(busy, LONG)
    offset = len(app_server.log())
    send(busy, LONG_PROMPT)
    busy_reply = greedy_reply_started(app_server, offset, LONG)
    wait_until_streaming(busy, bots=1)

    # Another user is answered, and served a UI-only event, while the first reply is still being generated.
    other = open_page(browser, app_server.url, errors)
    greedy(other, SHORT)
    offset = len(app_server.log())
    send(other, "你是谁？")
    other_reply = greedy_reply_started(app_server, offset, SHORT)
    assert other_reply.session != busy_reply.session
    _, finish = wait_for_reply(app_server, other, other_reply)
    assert finish in ("stop", "length")
    assert messages(other, "user") == ["你是谁？"]
    assert len(messages(other, "bot")) == 1
    other.click("#clear")  # a UI-only event: it does not wait behind generations
    other.wait_for_function(f"() => document.querySelectorAll('{ANY_MESSAGE}').length === 0")
    assert not has_ended(app_server, busy_reply), "the long reply ended first: nothing was checked"

    # A tab closed in the middle of a reply aborts it (a fresh one: the first may be near its end by now).
    busy.close()
    closing = open_page(browser, app_server.url, errors)
    greedy(closing, LONG)
    offset = len(app_server.log())
    send(closing, LONG_PROMPT)
    closing_reply = greedy_reply_started(app_server, offset, LONG)
    wait_until_streaming(closing, bots=1)
    closing.close()
    _, finish = wait_for_reply(app_server, other, closing_reply)
    assert finish == "abort"
    assert errors == []


def test_example_question_gets_the_identity_answer(
    browser: Browser, app_server, served_model_dir: Path, identity_name: str, tmp_path: Path
) -> None:
    errors: list[str] = []
    page = open_page(browser, app_server.url, errors)
    is_demo = app.model_info(os.environ.get("MODEL_SOURCE", ""), served_model_dir).is_demo
    assert page.locator("#demo-banner").count() == int(is_demo)
    assert "AI" in page.locator("#disclaimer").inner_text()
    greedy(page, SHORT)
    page.get_by_role("button", name="你是谁？").click()  # an example fills the textbox
    textbox = page.locator("#msg textarea")
    expect(textbox).to_have_value("你是谁？")
    offset = len(app_server.log())
    set_options(page, OPTIONS[page])
    textbox.press("Enter")
    wait_for_reply(app_server, page, greedy_reply_started(app_server, offset, SHORT))
    # The server logs the reply when it ends; the page renders the last throttled chunk a moment later.
    expect(page.locator('#chatbot [data-testid="bot"]').last).to_contain_text(identity_name, timeout=10_000)
    page.screenshot(path=tmp_path / "identity.png", full_page=True)
    assert errors == []
