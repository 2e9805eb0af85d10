"""The web chat page in a real headless Chromium (selenium + Debian's chromium and chromium-driver): type a
message, see streamed text arrive, press Stop, and the page says it stopped."""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY_RECIPE

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if not CHROMEDRIVER or not CHROMIUM:
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import train

    root = tmp_path_factory.mktemp("serve_browser")
    (root / "tiny.toml").write_text(TINY_RECIPE.replace("max_seq_len = 32", "max_seq_len = 256"))
    train(recipe_lib.load(root / "tiny.toml", ["train.max_iters=2"]), root / "run")
    s = Server(root / "run")
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def reply_text(driver) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
    return found[-1].text if found else ""


def test_chat_page_streams_and_stops(server, browser):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 20, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("run"))
    # a slow network (about 2 KB/s), so that the reply is still streaming when Stop is pressed
    browser.set_network_conditions(offline=False, latency=20, download_throughput=2048, upload_throughput=65536)
    try:
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("250")
        # greedy: a sampled reply of this barely trained model can draw EOS within a few tokens (about 2 in 260 a
        # token) and finish before Stop is pressed; its greedy reply is the same long one every time
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        browser.find_element(By.ID, "input").send_keys("Once upon a time")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled())
        wait.until(lambda d: reply_text(d) != "", message=f"no streamed text; status: {status(browser)}")
        assert status(browser).startswith("generating"), status(browser)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: status(d).startswith("stopped"), message=f"status: {status(browser)}")
        assert not browser.find_element(By.ID, "stop").is_enabled()
        assert browser.find_element(By.ID, "send").is_enabled()
        assert reply_text(browser)  # what was streamed before Stop is kept
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")] == ["Once upon a time"]
    finally:
        browser.delete_network_conditions()
