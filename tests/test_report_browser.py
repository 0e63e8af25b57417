"""Load a real run's report.html in headless Chromium: it renders, images decode, no console errors.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them);
without them the test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import numpy as np
import pandas as pd
import pytest

from factscope.plotting import COLORS, heatmap, new_figure
from factscope.runs import Run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        pytest.skip(
            f"chromium/chromedriver not installed: {' and '.join(missing)} not on PATH "
            "(Debian: apt-get install chromium chromium-driver; .ci/run does this)"
        )
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("chromium/chromedriver not installed: the selenium package is missing (pip install selenium)")
    return browser, driver


def _build_run(tmp_path) -> Run:
    run = Run.create(tmp_path / "run", {"command": "browser-test", "model": "tiny-llama", "data": "toy", "seed": 0})
    rng = np.random.default_rng(0)
    fig, ax = new_figure()
    ax.plot(range(12), rng.random(12), color=COLORS["subject"], label="subject")
    ax.legend()
    run.save_figure("curve", fig)
    fig, ax = new_figure()
    heatmap(ax, rng.normal(size=(5, 12)), xlabels=list(range(12)), ylabels=list("abcde"), center=0, colorbar="Δ")
    run.save_figure("heat", fig)
    run.save_table("effects", pd.DataFrame({"layer": np.arange(40), "effect": rng.normal(size=40),
                                            "token": ["<b>x</b> & \"y\""] * 40}))
    run.update_summary({"accuracy": 0.8125, "n": 40})
    run.add_section("main", "Main result", "Text with <tags> & **bold**.\n\n- item one\n- item two",
                    figures=["curve", {"name": "heat", "caption": "A heatmap"}], tables=["effects"])
    run.write_report()
    return run


def test_report_renders_in_headless_chromium(tmp_path):
    browser, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    run = _build_run(tmp_path)
    profile = tempfile.mkdtemp(prefix="factscope-chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get((run.dir / "report.html").resolve().as_uri())
        assert driver.title == "factscope browser-test — tiny-llama"
        assert driver.find_element(By.TAG_NAME, "h1").text == "factscope browser-test — tiny-llama"

        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 2
        for img in images:
            ok = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            assert ok, f"image {img.get_attribute('alt')!r} did not decode"
            assert img.size["width"] > 100

        tables = driver.find_elements(By.CSS_SELECTOR, "table")
        assert len(tables) == 1
        rows = tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")
        assert len(rows) == 30
        assert rows[0].find_elements(By.TAG_NAME, "td")[2].text == '<b>x</b> & "y"'  # escaped, shown literally
        assert "first 30 of 40 rows" in driver.find_element(By.CSS_SELECTOR, ".table-note").text

        # table of contents anchors point at existing sections
        for link in driver.find_elements(By.CSS_SELECTOR, "nav.toc a"):
            target = link.get_attribute("hash").lstrip("#")
            assert driver.find_elements(By.ID, target), f"dangling anchor #{target}"

        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()
