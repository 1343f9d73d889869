"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven
through /usr/bin/chromedriver by selenium) against a live server (tests/live_server.py).

It loads /, types a message, sees the reply stream in, stops it mid-way, sends another,
shows an error in the page, and saves a screenshot as a test artifact
(out/test-artifacts/serve_page.png, or under $HANDGPT_TEST_ARTIFACTS). .ci/run installs
the two Debian packages when they are missing, so CI runs this test; elsewhere, without
them, it is skipped with the command that installs them.
"""

import os
import time
from pathlib import Path

import httpx
import pytest
from live_server import ROOT, TEXT, chat_checkpoint, expected, live_server

import tokenizer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REQUIRED = "HANDGPT_REQUIRE_BROWSER"  # set by .ci/run: a missing browser fails, not skips


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "no Chromium: apt-get install -y chromium chromium-driver"
        if os.environ.get(REQUIRED):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    flags = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
    for arg in [*flags, "--window-size=900,700"]:
        options.add_argument(arg)
    # The driver is named: selenium never looks for one, or downloads one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def artifacts() -> Path:
    folder = Path(os.environ.get("HANDGPT_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_page_streams_a_reply_stops_it_and_shows_errors(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    tok = tokenizer.train_tokenizer(TEXT * 10, vocab_size=360)
    ckpt = tmp_path / "never_ends" / "ckpt.pt"
    model = chat_checkpoint(ckpt, tok, end_weight=0.0)  # greedy replies run to their budget
    with live_server(ckpt, "max_tokens=60") as live:
        live.slow_down(0.04)  # 25 tokens a second: slow enough to watch and to stop
        find = browser.find_element
        browser.get(live.url + "/")
        wait_for(lambda: "context 64" in find(By.ID, "model-info").text, what="the model")
        assert "never_ends" in find(By.ID, "model-info").text
        find(By.TAG_NAME, "summary").click()  # open the settings
        for field, value in (("temperature", "0"), ("max-tokens", "50")):
            find(By.ID, field).clear()
            find(By.ID, field).send_keys(value)

        box = find(By.ID, "input")
        box.send_keys("To be", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "or not")
        assert box.get_attribute("value") == "To be\nor not"  # Shift+Enter: a new line
        box.clear()
        box.send_keys("Who is Hamlet?", Keys.ENTER)  # Enter sends
        reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))[0]
        first = wait_for(lambda: reply.text, what="the first words")
        later = wait_for(lambda: len(reply.text) > len(first) and reply.text, what="more words")
        assert later.startswith(first) and "streaming" in reply.get_attribute("class")

        find(By.ID, "stop").click()
        wait_for(lambda: "(stopped)" in find(By.ID, "messages").text, what="the stop")
        stopped = reply.text
        whole = expected(model, tok, [{"role": "user", "content": "Who is Hamlet?"}], 50)
        assert whole["text"].lstrip().startswith(stopped) and len(stopped) < len(whole["text"])
        wait_for(lambda: httpx.get(live.url + "/health").json()["rows"] == 0, what="the row")
        time.sleep(0.2)
        assert reply.text == stopped  # nothing more came

        find(By.ID, "max-tokens").clear()
        find(By.ID, "max-tokens").send_keys("6")
        box.send_keys("And Polonius?", Keys.ENTER)
        wait_for(lambda: "token limit" in find(By.ID, "messages").text, what="the second reply")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2
        browser.save_screenshot(str(artifacts() / "serve_page.png"))

        find(By.ID, "max-tokens").clear()
        find(By.ID, "max-tokens").send_keys("1000")  # over the server's max_tokens (60)
        box.send_keys("Once more", Keys.ENTER)
        error = wait_for(lambda: find(By.ID, "error").text, what="the error")
        assert "max_tokens" in error and "60" in error
        assert box.get_attribute("value") == "Once more"  # given back, to send again
        find(By.ID, "new-chat").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    assert (artifacts() / "serve_page.png").stat().st_size > 10_000
