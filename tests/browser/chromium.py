"""Headless Debian Chromium driven by Selenium, for the web demo's end-to-end test.

Debian's `chromium` and `chromium-driver` packages (apt-get install -y chromium chromium-driver) are used
instead of a downloaded browser: the test machines have no network beyond loopback. The background-networking
flags matter there: without them Chromium's own connection attempts get the page's connections refused.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when Debian's chromium / chromium-driver are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(browser: str, driver: str, user_data_dir: Path, size: tuple[int, int] = (1280, 1000)):
    """A headless Chromium with a fresh profile in `user_data_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS + [f"--window-size={size[0]},{size[1]}", f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, condition, timeout: float, what: str):
    """Poll `condition(driver)` until it is truthy; fail naming `what` (and the page's error toasts)."""
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page messages: "
                             f"{toasts(driver)!r}") from None


def images_in(driver, css: str) -> list[str]:
    """The non-empty `src` of every <img> under the elements matching `css`."""
    from selenium.webdriver.common.by import By

    return [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, f"{css} img")
            if img.get_attribute("src")]


def toasts(driver) -> list[str]:
    """Text of the error / warning messages gradio shows in the page corner."""
    from selenium.webdriver.common.by import By

    return [t.text for t in driver.find_elements(By.CSS_SELECTOR, ".toast-body") if t.text]


def draw_stroke(driver, element, points: list[tuple[int, int]]) -> None:
    """Press the mouse at the first point, drag through the others, release (offsets from the element's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = points[0]
    chain = ActionChains(driver).move_to_element_with_offset(element, x, y).click_and_hold()
    for nx, ny in points[1:]:
        chain = chain.move_by_offset(nx - x, ny - y)
        x, y = nx, ny
    chain.release().perform()
    time.sleep(0.2)  # the editor commits the stroke on pointerup, asynchronously
