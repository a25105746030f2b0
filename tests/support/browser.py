"""A real browser for the tests: Debian's headless Chromium through its chromedriver (selenium).

`make test` installs both (`make browser-install`). Selenium calls block, and the
gateway under test often runs in the test's own event loop, so every call goes
through a worker thread: `await browser.call(lambda d: d.get(url))`.

The browser never reaches anything but the loopback address of the page under test:
background networking, component updates and sync are off, and each browser gets a
fresh profile directory.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

INSTALL_HINT = (
    "chromium and chromedriver are not installed; `make test` installs them "
    "(or: apt-get install -y --no-install-recommends chromium chromium-driver)"
)
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
)

T = TypeVar("T")


class Browser:
    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def call(self, fn: Callable[[webdriver.Chrome], T]) -> T:
        return await asyncio.to_thread(fn, self.driver)

    async def get(self, url: str) -> None:
        await self.call(lambda d: d.get(url))

    async def text(self, css: str) -> str:
        return await self.call(lambda d: d.find_element(By.CSS_SELECTOR, css).text)

    async def texts(self, css: str) -> list[str]:
        return await self.call(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, css)])

    async def attr(self, css: str, name: str) -> str | None:
        return await self.call(lambda d: d.find_element(By.CSS_SELECTOR, css).get_attribute(name))

    async def click(self, css: str) -> None:
        await self.call(lambda d: d.find_element(By.CSS_SELECTOR, css).click())

    async def submit(self, css: str, timeout_s: float = 10.0) -> None:
        """Click a button that submits a form, and wait until the next page has loaded."""

        def run(d: webdriver.Chrome) -> None:
            old = d.find_element(By.TAG_NAME, "html")
            d.find_element(By.CSS_SELECTOR, css).click()
            wait = WebDriverWait(d, timeout_s)
            wait.until(lambda _: _gone(old))
            wait.until(lambda drv: drv.execute_script("return document.readyState") == "complete")

        await self.call(run)

    async def type(self, css: str, value: str) -> None:
        await self.call(lambda d: d.find_element(By.CSS_SELECTOR, css).send_keys(value))

    async def source(self) -> str:
        return await self.call(lambda d: d.page_source)

    async def screenshot(self, path: Path) -> None:
        await self.call(lambda d: d.save_screenshot(str(path)))

    async def script(self, js: str) -> Any:
        return await self.call(lambda d: d.execute_script(js))


def _gone(element: WebElement) -> bool:
    """Whether a page's element belongs to a page that is no longer shown. Chromium says so
    with a stale-element error, or, while the next page is being attached, an "unknown
    error" that the node does not belong to the document."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def _binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return chromium, driver


@pytest_asyncio.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    chromium, driver_path = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in HEADLESS_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = await asyncio.to_thread(webdriver.Chrome, options=options, service=service)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)
