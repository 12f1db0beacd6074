"""A real browser on the real UI: `dagster-webserver` on 127.0.0.1 with two processed tracks,
opened in headless Debian Chromium through Selenium and the system chromedriver."""

import os
import shutil
import time

import pytest

from conftest import write_bundle
from dagster_server import dagster_server
from imaker.settings import load_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# .ci/run installs Chromium (scripts/test.sh); only a local run without it may skip.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="Debian chromium + chromium-driver not installed")


@pytest.fixture
def webserver(imaker_env, source_m4a, cover_jpg, tmp_path):
    from dagster import DagsterInstance

    from imaker_assets import operations

    settings = load_settings()
    write_bundle(settings.queue_youtube_audio, "track_one", source_m4a, cover=cover_jpg)
    write_bundle(settings.queue_other, "track_two", source_m4a, title="Second")
    assert operations.ingest_once(DagsterInstance.get(), settings) == 0
    with dagster_server(["dagster-webserver"], tmp_path / "webserver.log") as (_, url):
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _click(driver, element):
    """Click through overlays (Dagster may pop up its newsletter prompt at any time)."""
    driver.execute_script("arguments[0].click();", element)


def _wait_for_text(driver, texts, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{texts} not all visible; page shows: {body[:2000]}")


def test_catalog_partitions_and_checks_are_visible_in_the_ui(webserver, browser, tmp_path):
    browser.get(f"{webserver}/assets/variants?view=partitions")
    _wait_for_text(browser, ["track_one", "track_two"])
    browser.save_screenshot(str(tmp_path / "variants_partitions.png"))
    # one partition's metadata: loudness per variant and the waveform pictures
    _click(browser, browser.find_element("xpath", "//*[normalize-space(text())='track_one']"))
    _wait_for_text(browser, ["waveforms", "per_variant", "total_bytes"])
    row = browser.find_element("xpath", "//tr[.//*[normalize-space(text())='waveforms']]")
    _click(browser, row.find_element("xpath", ".//*[contains(text(), 'Show Markdown')]"))
    deadline = time.time() + 30
    images = []
    while time.time() < deadline and len(images) < 2:
        images = [i for i in browser.find_elements("tag name", "img")
                  if (i.get_attribute("src") or "").startswith("data:image/png")
                  and i.size["width"] > 100]
        time.sleep(0.5)
    assert len(images) >= 2, "the source and instrumental waveforms are not rendered"
    for button in browser.find_elements("xpath", "//button[normalize-space(.)='Skip']"):
        _click(browser, button)  # Dagster's own newsletter prompt, for a clean screenshot
    browser.save_screenshot(str(tmp_path / "track_one_metadata.png"))

    browser.get(f"{webserver}/assets/variants?view=checks")
    body = _wait_for_text(browser, ["variants_do_not_clip", "variants_match_source_duration"])
    assert "Passed" in body or "Succeeded" in body, body[:2000]
    browser.save_screenshot(str(tmp_path / "variants_checks.png"))

    browser.get(f"{webserver}/assets/catalog")
    _wait_for_text(browser, ["catalog"])
    browser.save_screenshot(str(tmp_path / "catalog.png"))
    assert (tmp_path / "variants_partitions.png").stat().st_size > 10_000
    os.environ.get("IMAKER_KEEP_SCREENSHOTS") and shutil.copytree(
        tmp_path, os.environ["IMAKER_KEEP_SCREENSHOTS"], dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("chrome", "data", "dagster_home"))
