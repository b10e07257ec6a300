"""The chat page in a real browser: Python Playwright driving Debian's Chromium against ``python app.py``.

Needs `apt-get install -y chromium fonts-noto-cjk` (no `playwright install`: the system Chromium is used).
Run: python -m pytest -m browser tests/app/test_browser.py
It runs against ``rambling_app`` (see conftest), whose greedy replies are long enough to stop, and the compare
view against ``compare_app``. The app log is the ground truth the tests wait on, never a fixed time: a reply's
first line tells which page session and engine (``main``, or ``compare`` for the "Before" chat) it belongs to
and the sampling values the page really sent; its last line when it ended and why ("finish abort" = the engine
stopped it).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

import app
from infer_engine.engine import create_engine
from infer_engine.settings import MAX_MESSAGE_CHARS, EngineSettings, GenerationParams

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
REPLY_ENDED_LOG = (
    r"reply {session}: prompt \d+ tok, completion (\d+) tok, dropped \d+ msgs, finish (\w+)"
    r"[^\n]*, engine {engine}\b"
)
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


def messages(page: Page, role: str, chat: str = "chatbot") -> list[str]:
    """The texts of the ``role`` messages in the chat of id ``chat`` (``chatbot-before``: the compare view's
    "Before")."""
    return page.locator(f'#{chat} [data-testid="{role}"]').all_inner_texts()


def send(page: Page, text: str) -> None:
    set_options(page, OPTIONS.get(page, {}))  # still in place: typed again if the page lost one
    textbox = page.locator("#msg textarea")
    textbox.fill(text)
    textbox.press("Enter")


def wait_until_streaming(page: Page, bots: int, chat: str = "chatbot") -> None:
    """Wait until the chat of id ``chat`` shows ``bots`` answers, the last one with some text."""
    page.wait_for_function(
        """([n, chat]) => { const b = document.querySelectorAll(`#${chat} [data-testid="bot"]`);
                  return b.length === n && b[n - 1].innerText.trim().length > 0; }""",
        arg=[bots, chat],
    )


def wait_until_settled(page: Page) -> None:
    """Wait until the page shows no pending event and the answers (in every chat) stop changing."""
    page.wait_for_function("() => document.querySelectorAll('.generating, .pending').length === 0")
    before = None
    while (now := page.locator('[data-testid="bot"]').all_inner_texts()) != before:
        before = now
        time.sleep(0.3)


@dataclass(frozen=True)
class Reply:
    """A reply the app started, as its log tells: the page session, the engine, the sampling values it got."""

    session: str
    max_new_tokens: int
    top_k: int
    logged_at: int  # log offset of its first line: its last line comes after
    engine: str = "main"  # ``compare`` for the compare view's "Before" chat


def reply_started(app_server, offset: int, engine: str = "main") -> Reply:
    """Wait for the first reply the app starts on ``engine`` past log offset ``offset``; return what it was
    asked for."""
    started = app_server.wait_for_log(rf"{REPLY_STARTED_LOG}, engine {engine}\b", after=offset)
    return Reply(
        session=started.group(1),
        max_new_tokens=int(started.group(2)),
        top_k=int(started.group(3)),
        logged_at=started.end(),
        engine=engine,
    )


def greedy_reply_started(app_server, offset: int, max_new_tokens: int, engine: str = "main") -> Reply:
    """``reply_started``, checking that the page's greedy options really reached the engine."""
    reply = reply_started(app_server, offset, engine)
    assert (reply.top_k, reply.max_new_tokens) == (1, max_new_tokens), reply
    return reply


def wait_for_reply(app_server, page: Page, reply: Reply) -> tuple[int, str]:
    """Wait for ``reply`` to end (per the app log) and the page to settle; return (tokens, finish)."""
    ended = REPLY_ENDED_LOG.format(session=reply.session, engine=reply.engine)
    finished = app_server.wait_for_log(ended, after=reply.logged_at)
    wait_until_settled(page)
    return int(finished.group(1)), finished.group(2)


def has_ended(app_server, reply: Reply) -> bool:
    """Whether the app has logged the end of ``reply``."""
    ended = re.compile(REPLY_ENDED_LOG.format(session=reply.session, engine=reply.engine))
    return ended.search(app_server.log(), reply.logged_at) is not None


def click_until_logged(page: Page, app_server, button: str, session: str) -> None:
    """Click ``button`` until the app logs that it stopped ``session``'s replies (Stop, Undo and Clear do).

    Under load a click can land while the page still moves (an output's progress indicator appearing or
    going), and miss the button; the app's log line says the click really reached the server.

    Args:
        page: the chat page.
        app_server: the running app.
        button: the button's element id.
        session: the page's engine session (from the log).
    """
    offset = len(app_server.log())
    tries = 3
    for _ in range(tries):
        page.click(button)
        with contextlib.suppress(pytest.fail.Exception):
            app_server.wait_for_log(rf"stop {session}: its replies end now", after=offset, timeout_s=20)
            return
    pytest.fail(f"{button} clicked {tries} times: the app never stopped {session}")


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

    # What the page refuses is said on the page, not only in the server's reply.
    send(page, "   \n\t  ")
    expect(page.get_by_text("Type a message first.")).to_be_visible()
    assert messages(page, "user") == messages(page, "bot") == []
    # A paste over the limit is refused whole, not cut short without a word, and stays to be trimmed.
    too_long = "长" * (MAX_MESSAGE_CHARS + 1)
    send(page, too_long)
    expect(page.get_by_text(f"the message is too long ({MAX_MESSAGE_CHARS + 1} characters)")).to_be_visible()
    assert textbox.input_value() == too_long
    assert messages(page, "user") == messages(page, "bot") == []
    # So is one within the characters but over the tokens the session leaves for the prompt; and a refusal
    # covers neither the chat nor the box with an "Error" panel: both stay in view, the box usable.
    too_many_tokens = "长" * (MAX_MESSAGE_CHARS - 1)
    send(page, too_many_tokens)
    expect(page.get_by_text("prompt tokens, but only")).to_be_visible()
    assert textbox.input_value() == too_many_tokens
    assert messages(page, "user") == messages(page, "bot") == []
    expect(page.locator("#chatbot .error, #msg .error")).to_have_count(0)
    textbox.fill("", timeout=5000)  # fails while anything lies over the box
    assert errors == []


def test_a_question_sent_while_a_reply_streams_replaces_it_and_is_answered(
    browser: Browser, crawling_app
) -> None:
    # With tokens as slow as a real model's, the browser's cancel of the running reply lost the race to the
    # new question, and the browser dropped the new answer as the old one still looked pending: the question
    # stayed unanswered (seen with `make demo`). The page's own options, as a user leaves them.
    app_server = crawling_app
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app_server.url)
    textbox = page.locator("#msg textarea")
    offset = len(app_server.log())
    textbox.fill(LONG_PROMPT)
    textbox.press("Enter")
    long_reply = reply_started(app_server, offset)
    first_bot = "document.querySelector('#chatbot [data-testid=\"bot\"]')"
    page.wait_for_function(f"() => {first_bot}?.innerText.length > 40")  # some 10 tokens in
    # The next question, typed while the long answer streams (no Stop first), as a user does.
    offset = len(app_server.log())
    textbox.fill("你是谁？")
    textbox.press("Enter")
    next_reply = reply_started(app_server, offset)
    assert next_reply.session == long_reply.session
    ended = app_server.wait_for_log(REPLY_ENDED_LOG.format(session=long_reply.session, engine="main"),
                                    after=long_reply.logged_at)
    assert ended.group(2) == "abort"
    wait_until_streaming(page, bots=2)  # the new answer shows on the page
    click_until_logged(page, app_server, "#stop", next_reply.session)  # it runs long too: end it, then look
    _, finish = wait_for_reply(app_server, page, next_reply)
    assert finish == "abort"
    assert messages(page, "user") == [LONG_PROMPT, "你是谁？"]
    assert len(messages(page, "bot")) == 2 and messages(page, "bot")[-1].strip()
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


def own_greedy_answer(model_dir: Path, question: str, max_new_tokens: int) -> str:
    """What the model in ``model_dir`` answers to ``question`` on its own engine, with the page's greedy
    values (top-k 1, the other sliders at their defaults)."""
    engine = create_engine(model_dir, EngineSettings(backend="transformers"))
    try:
        params = GenerationParams(max_new_tokens=max_new_tokens, top_k=1)
        return "".join(engine.stream_chat([{"role": "user", "content": question}], params, "own-answer"))
    finally:
        engine.close()


def answers(page: Page) -> tuple[list[str], list[str]]:
    """The compare view's answers: the "After" chat's and the "Before" chat's."""
    return messages(page, "bot"), messages(page, "bot", "chatbot-before")


def letters(text: str) -> str:
    """``text`` without spaces and punctuation: a random model's reply may hold Markdown syntax, which the
    page renders (``**`` -> bold) rather than shows."""
    return re.sub(r"[\W_]", "", text)


def test_compare_view_asks_both_models_and_stop_retry_undo_clear_act_on_both(
    browser: Browser, compare_app, served_model_dir: Path, slow_rambling_model_dir: Path, tmp_path: Path
) -> None:
    app_server = compare_app
    errors: list[str] = []
    page = open_page(browser, app_server.url, errors)
    expect(page.locator("#chatbot-before")).to_contain_text("Before: ")
    expect(page.locator("#chatbot")).to_contain_text("After: ")
    textbox = page.locator("#msg textarea")
    greedy(page, SHORT)

    # One question goes to both models, each answers on its own engine, each chat shows its model's answer.
    offset = len(app_server.log())
    send(page, "你是谁？")
    after = greedy_reply_started(app_server, offset, SHORT, "main")
    before = greedy_reply_started(app_server, offset, SHORT, "compare")
    assert after.session == before.session
    for reply in (after, before):
        assert wait_for_reply(app_server, page, reply)[1] in ("stop", "length")
    for chat in ("chatbot", "chatbot-before"):
        assert messages(page, "user", chat) == ["你是谁？"]
    (after_answer,) = messages(page, "bot")
    (before_answer,) = messages(page, "bot", "chatbot-before")
    assert after_answer.strip() == own_greedy_answer(served_model_dir, "你是谁？", SHORT).strip()
    assert letters(before_answer) == letters(own_greedy_answer(slow_rambling_model_dir, "你是谁？", SHORT))
    assert before_answer != after_answer
    page.screenshot(path=tmp_path / "compare.png", full_page=True)

    # Retry generates both last answers again (the same ones: decoding is greedy).
    offset = len(app_server.log())
    set_options(page, OPTIONS[page])
    page.click("#retry")
    for engine in ("main", "compare"):
        wait_for_reply(app_server, page, greedy_reply_started(app_server, offset, SHORT, engine))
    assert answers(page) == ([after_answer], [before_answer])

    # Stop ends the long "Before" answer in its engine, and the page stays as Stop left it.
    greedy(page, LONG)
    offset = len(app_server.log())
    send(page, LONG_PROMPT)
    replies = [greedy_reply_started(app_server, offset, LONG, engine) for engine in ("main", "compare")]
    wait_until_streaming(page, bots=2, chat="chatbot-before")
    click_until_logged(page, app_server, "#stop", replies[1].session)
    tokens, finish = wait_for_reply(app_server, page, replies[1])
    assert (finish, tokens < LONG) == ("abort", True)
    wait_for_reply(app_server, page, replies[0])  # the tuned model's short answer (or its abort) ended too
    stopped = answers(page)
    time.sleep(QUIET_S)
    assert answers(page) == stopped and [len(answer) for answer in stopped] == [2, 2]
    for chat in ("chatbot", "chatbot-before"):
        assert messages(page, "user", chat) == ["你是谁？", LONG_PROMPT]

    # Undo removes the last turn from both chats and puts its question back.
    page.click("#undo")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"user\"]').length === 2")
    expect(textbox).to_have_value(LONG_PROMPT)
    assert answers(page) == ([after_answer], [before_answer])

    # Clear while the "Before" answer streams empties both chats for good and stops that answer.
    offset = len(app_server.log())
    send(page, LONG_PROMPT)
    long_before = greedy_reply_started(app_server, offset, LONG, "compare")
    wait_until_streaming(page, bots=2, chat="chatbot-before")
    click_until_logged(page, app_server, "#clear", long_before.session)
    tokens, finish = wait_for_reply(app_server, page, long_before)
    assert (finish, tokens < LONG) == ("abort", True)
    everywhere = '[data-testid="user"], [data-testid="bot"]'
    page.wait_for_function(f"() => document.querySelectorAll('{everywhere}').length === 0")
    time.sleep(QUIET_S)
    assert page.locator(everywhere).count() == 0
    assert errors == []
