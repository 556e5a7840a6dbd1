"""End to end: a real uvicorn server on a free loopback port, driven by headless Chromium."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrkit.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")

LOADED_IMAGES = """return Array.from(document.querySelectorAll('#results img'))
    .filter(img => img.complete && img.naturalWidth > 0).length;"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(colour_index: Path, colour_encoder) -> Iterator[str]:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(create_app(colour_index, encoder=colour_encoder), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    ready = threading.Event()
    for _ in range(400):  # up to ~20 s for the socket to open
        if srv.started or not thread.is_alive():
            break
        ready.wait(0.05)
    if not srv.started:
        pytest.fail("uvicorn did not start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path: Path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("headless Chromium is not installed (run scripts/install_chromium.sh)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_images(driver, n_min: int = 1) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script(LOADED_IMAGES) >= n_min)
    return driver.execute_script(LOADED_IMAGES)


def card_ids(driver) -> list[str]:
    # One script call reads every card at once: the grid may be re-rendered between two lookups.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results .card .id')).map(e => e.textContent);")


@pytest.mark.slow
def test_type_a_query_and_see_images(server: str, browser, tmp_path: Path, colour_dataset) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: "8 images" in d.find_element(By.ID, "info").text)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    box = browser.find_element(By.ID, "q")
    box.send_keys("red and white stripes", Keys.RETURN)

    assert wait_for_images(browser) == 5
    ids = card_ids(browser)
    assert ids[0] == "red-white" and ids[1] == "red"
    assert "5 results" in browser.find_element(By.ID, "status").text
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert "red and white stripes" in first.text
    shot = tmp_path / "search.png"
    assert browser.save_screenshot(str(shot))

    # The screenshot really shows the striped red/white image: many red and white pixels.
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    red = np.all(np.abs(px - (220, 30, 30)) < 12, axis=-1).sum()
    assert red > 5000

    # Search by photo: upload the blue/black stripes, the same picture comes back first.
    browser.find_element(By.ID, "photo").send_keys(str(colour_dataset[7].path))
    browser.find_element(By.ID, "photo-button").click()
    WebDriverWait(browser, 30).until(lambda d: card_ids(d)[:1] == ["blue-black"])
    wait_for_images(browser)
    browser.save_screenshot(str(tmp_path / "photo.png"))

    # An error is shown on the page, and the next query still works.
    box.clear()
    box.send_keys("   ", Keys.RETURN)
    WebDriverWait(browser, 10).until(lambda d: "type a description" in d.find_element(By.ID, "status").text)
    box.send_keys("yellow", Keys.RETURN)
    WebDriverWait(browser, 30).until(lambda d: card_ids(d)[:1] == ["yellow"])
