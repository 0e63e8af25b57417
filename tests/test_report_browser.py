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


CURVE = np.random.default_rng(1).random(12)


def _build_run(tmp_path) -> Run:
    run = Run.create(tmp_path / "run", {"command": "browser-test", "model": "tiny-llama", "data": "toy", "seed": 0})
    rng = np.random.default_rng(0)
    fig, ax = new_figure()
    ax.plot(range(12), CURVE, color=COLORS["subject"], label="subject")
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
    run.write_report(static=True)
    return run


def _chromium(tmp_path):
    browser, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="factscope-chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    return driver


def test_interactive_figures_offline(tmp_path):
    """The interactive report with every network URL blocked: both figures draw, the line's data
    are the figure's own numbers, hovering a point shows its value, a legend click hides the
    series, nothing is fetched, no console error; screenshots at 1,400 px and phone width."""
    from selenium.webdriver.common.by import By

    run = _build_run(tmp_path)
    path = run.write_report()
    driver = _chromium(tmp_path)
    try:
        driver.get(path.resolve().as_uri())
        figs = driver.find_elements(By.CSS_SELECTOR, ".plotly-fig")
        assert len(figs) == 2 and not driver.find_elements(By.TAG_NAME, "img")
        assert all(f.find_elements(By.CSS_SELECTOR, "svg.main-svg") for f in figs)
        y = driver.execute_script("return document.querySelector('.plotly-fig').data[0].y")
        assert y == pytest.approx(CURVE.tolist())
        text = driver.execute_script(
            "var gd = document.querySelector('.plotly-fig'); Plotly.Fx.hover(gd, [{curveNumber: 0, pointNumber: 3}]);"
            "var t = gd.querySelector('.hovertext'); return t ? t.textContent : null;")
        assert text is not None and f"{CURVE[3]:.3f}"[:4] in text, text
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.support.ui import WebDriverWait

        toggle = figs[0].find_element(By.CSS_SELECTOR, ".legendtoggle")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", toggle)
        ActionChains(driver).move_to_element(toggle).click().perform()
        # Plotly waits out a possible double click before it toggles
        WebDriverWait(driver, 5).until(lambda d: d.execute_script(
            "return document.querySelector('.plotly-fig').data[0].visible") == "legendonly")
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
        assert fetched == []
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
        driver.save_screenshot(str(run.dir / "screenshot_1400.png"))
        driver.set_window_size(390, 1200)
        # Plotly's responsive figures follow the window after a short debounce
        try:
            WebDriverWait(driver, 5).until(lambda d: d.execute_script(
                "return document.documentElement.scrollWidth") <= 400)
        finally:
            driver.save_screenshot(str(run.dir / "screenshot_390.png"))
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, f"the page scrolls sideways at phone width ({width} px)"
    finally:
        driver.quit()


def test_report_renders_in_headless_chromium(tmp_path):
    """The static report (--static): images decode, the table is escaped, anchors resolve."""
    from selenium.webdriver.common.by import By

    run = _build_run(tmp_path)
    driver = _chromium(tmp_path)
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


def test_facts_table_filters_sorts_and_opens_a_fact(tmp_path):
    """A 1,000-fact run: the page loads (time printed), the search filters, a header click sorts,
    and a fact's panel shows its prompt with the subject marked and its own knockout numbers."""
    import time

    from selenium.webdriver.common.by import By

    n = 1000
    run = Run.create(tmp_path / "facts", {"command": "facts-test", "model": "tiny-llama"})
    ids = [f"f{i:04d}" for i in range(n)]
    run.save_table("known_facts", pd.DataFrame({"id": ids, "subject": [f"Subject {i}" for i in range(n)],
                                                "prompt": [f"Subject {i} is located in" for i in range(n)],
                                                "target": ["Paris"] * n, "rank": [i % 7 for i in range(n)]}))
    run.save_table("knockout_facts", pd.DataFrame(
        [{"key": f, "set": "subject", "layer": l, "change": -float(i % 50) - l} for i, f in enumerate(ids)
         for l in range(18)]))
    run.add_section("k", "Knockout", "per-fact data only")
    path = run.write_report()
    driver = _chromium(tmp_path)
    try:
        t = time.perf_counter()
        driver.get(path.resolve().as_uri())
        load = time.perf_counter() - t
        ms = driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
        print(f"1,000-fact report: {path.stat().st_size / 1e6:.1f} MB, loaded in {load:.2f} s (load event {ms:.0f} ms)")
        assert load < 10
        count = driver.find_element(By.CSS_SELECTOR, ".facts-count")
        assert count.text == "1000 of 1000 facts, first 50 shown"
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.facts tbody tr")) == 50  # built a page at a time
        driver.find_element(By.CSS_SELECTOR, "input.facts-search").send_keys("Subject 123 ")
        assert count.text == "1 of 1000 facts"
        driver.find_element(By.CSS_SELECTOR, "input.facts-search").clear()
        driver.execute_script("document.querySelector('input.facts-search').dispatchEvent(new Event('input'))")
        rank = driver.find_elements(By.CSS_SELECTOR, "table.facts thead th")[4]
        rank.click()
        rank.click()  # descending
        first = driver.find_element(By.CSS_SELECTOR, "table.facts tbody tr")
        assert first.find_elements(By.TAG_NAME, "td")[4].text == "6"
        driver.find_element(By.CSS_SELECTOR, "input.facts-search").send_keys("f0123")
        driver.find_element(By.CSS_SELECTOR, "table.facts tbody tr").click()
        panel = driver.find_element(By.CSS_SELECTOR, ".fact-panel")
        assert panel.is_displayed()
        assert panel.find_element(By.TAG_NAME, "mark").text == "Subject 123"
        y = driver.execute_script("return document.querySelector('.fact-chart').data[0].y")
        assert y == [-(123 % 50) - l for l in range(18)]
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
        driver.save_screenshot(str(run.dir / "screenshot_fact.png"))
    finally:
        driver.quit()
