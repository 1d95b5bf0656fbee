"""Headless Chromium for the browser tests: a Selenium driver with flags that render OHIF's WebGL viewports in
software (SwiftShader), and pixel statistics of a page element taken from a real screenshot."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pacs_testing import CHROMEDRIVER, CHROMIUM
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement

# known to render OHIF v3 (cornerstone3D, WebGL2) without a GPU
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--disable-background-networking",
    "--window-size=1600,1000",
)


@contextmanager
def chromium(log_path: Path | None = None) -> Iterator[webdriver.Chrome]:
    """A headless Chromium driven by chromedriver; always quit, also when the test fails."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in HEADLESS_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(log_path) if log_path else None)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, path: Path | None = None) -> np.ndarray:
    """The page as an (h, w, 3) uint8 RGB array; also written to ``path`` as PNG when given."""
    png = driver.get_screenshot_as_png()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def element_pixels(driver: webdriver.Chrome, element: WebElement, path: Path | None = None) -> np.ndarray:
    """The screenshot pixels inside ``element``'s box (device pixels)."""
    page = screenshot(driver, path)
    ratio = float(driver.execute_script("return window.devicePixelRatio") or 1.0)
    r = element.rect
    x0, y0 = int(r["x"] * ratio), int(r["y"] * ratio)
    x1, y1 = int((r["x"] + r["width"]) * ratio), int((r["y"] + r["height"]) * ratio)
    return page[max(y0, 0) : y1, max(x0, 0) : x1]


def grey_std(pixels: np.ndarray) -> float:
    """Spread of the grey values: a rendered CT slice has many, a blank or uniform canvas none."""
    return float(pixels.astype(np.float32).mean(axis=2).std()) if pixels.size else 0.0


def coloured_fraction(pixels: np.ndarray, min_chroma: int = 40) -> float:
    """Fraction of pixels that are clearly not grey (max - min channel >= ``min_chroma``): a greyscale CT has
    none, a segmentation overlay makes them."""
    if not pixels.size:
        return 0.0
    p = pixels.astype(np.int16)
    chroma = p.max(axis=2) - p.min(axis=2)
    return float((chroma >= min_chroma).mean())
