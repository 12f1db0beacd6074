"""A real browser on the real UI: `dagster-webserver` on 127.0.0.1 with two processed tracks,
opened in headless Debian Chromium through Selenium and the system chromedriver; and the
library page of the media server (`imaker media serve`) playing them."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import imaker_env_at, write_bundle
from dagster_server import dagster_server, free_port
from imaker.audio import probe
from imaker.settings import load_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# .ci/run installs Chromium (scripts/test.sh); only a local run without it may skip.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="Debian chromium + chromium-driver not installed")


@pytest.fixture(scope="module")
def _processed_once(tmp_path_factory, model_repo, source_m4a, cover_jpg):
    """Two real tracks through `imaker ingest --once`'s code path, once for the module (the
    tests only look at them)."""
    from dagster import DagsterInstance

    from imaker_assets import operations

    root = tmp_path_factory.mktemp("browser_tracks")
    media_port = str(free_port())
    with pytest.MonkeyPatch.context() as mp:
        imaker_env_at(mp, root, model_repo)
        mp.setenv("MEDIA_PORT", media_port)
        settings = load_settings()
        write_bundle(settings.paths.queue_youtube_audio, "track_one", source_m4a, cover=cover_jpg)
        write_bundle(settings.paths.queue_other, "track_two", source_m4a, title="Second")
        assert operations.ingest_once(DagsterInstance.get(), settings) == 0
    return root, media_port


@pytest.fixture
def processed(_processed_once, monkeypatch, model_repo):
    """The module's two tracks, with their settings in the environment; the media links in
    their metadata point at MEDIA_PORT, a free loopback port (the `media_server` fixture)."""
    root, media_port = _processed_once
    imaker_env_at(monkeypatch, root, model_repo)
    monkeypatch.setenv("MEDIA_PORT", media_port)
    return load_settings()


@pytest.fixture
def webserver(processed, tmp_path):
    with dagster_server(["dagster-webserver"], tmp_path / "webserver.log") as (_, url):
        yield url


@pytest.fixture
def media_server(processed, tmp_path):
    """`imaker media serve` (README command 1 starts it beside `dagster dev`)."""
    settings = processed
    exe = str(Path(sys.executable).with_name("imaker"))
    with open(tmp_path / "media.log", "wb") as log:
        proc = subprocess.Popen([exe, "media", "serve"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{settings.media.base_url}/health", timeout=5)
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "media.log").read_text()
                    assert time.time() < deadline, "imaker media serve did not start"
                    time.sleep(0.2)
            yield settings.media.base_url
        finally:
            proc.terminate()
            proc.wait(timeout=15)


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


def _file_for(settings, url: str) -> Path:
    """The file a media server URL serves (/outputs/... or /library/...)."""
    prefix, _, rel = unquote(urlsplit(url).path).lstrip("/").partition("/")
    root = {"outputs": settings.paths.outputs_dir, "library": settings.paths.library_dir}[prefix]
    return root / rel


def _wait_for_metadata(driver, audio, timeout=30):
    """Wait until the element has loaded its metadata; return (duration, seekable end)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.execute_script(
            "const a = arguments[0]; return [a.readyState, a.duration, "
            "a.seekable.length ? a.seekable.end(a.seekable.length - 1) : null, "
            "a.error ? a.error.code : null];", audio)
        assert state[3] is None, f"{audio.get_attribute('src')}: media error {state[3]}"
        if state[0] >= 1 and isinstance(state[1], (int, float)) and state[1] > 0:
            return float(state[1]), state[2]
        time.sleep(0.2)
    raise AssertionError(f"{audio.get_attribute('src')}: no duration after {timeout} s: {state}")


def test_library_page_plays_every_track_in_the_browser(media_server, processed, browser,
                                                       tmp_path):
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    settings = processed
    instance = DagsterInstance.get()
    # the partition's metadata: a link per variant and for the source, served as audio
    [record] = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("variants"), asset_partitions=["track_one"]),
        limit=1).records
    meta = record.asset_materialization.metadata
    links = {k: v.value for k, v in meta.items() if k.startswith("play_")}
    assert set(links) == {"play_source", "play_instrumental", "play_no_drums"}
    manifest = json.loads((settings.paths.outputs_dir / "track_one" / "manifest.json").read_text())
    expected = {f"play_{a['variant']}": a["path"] for a in manifest["artifacts"]}
    for key, url in links.items():
        assert url.startswith(f"{media_server}/"), url
        path = _file_for(settings, url)
        assert path == (settings.paths.library_dir / "track_one" / "source.flac" if key == "play_source"
                        else settings.paths.outputs_dir / "track_one" / expected[key])
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("audio/")
            assert resp.read() == path.read_bytes()
    [src_record] = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("source_audio"), asset_partitions=["track_one"]),
        limit=1).records
    assert src_record.asset_materialization.metadata["play"].value == links["play_source"]
    # the catalog links the library page
    catalog = instance.get_latest_materialization_event(AssetKey("catalog"))
    page_link = catalog.asset_materialization.metadata["library_page"].value
    assert page_link == f"{media_server}/"

    browser.get(page_link)
    _wait_for_text(browser, ["Test Song", "Second", "AC/DC", "YTDL", "0:03"])
    articles = browser.find_elements("css selector", "article.track")
    created = {j: json.loads((settings.paths.outputs_dir / j / "manifest.json").read_text())
               ["provenance"]["created_at"] for j in ("track_one", "track_two")}
    assert [a.get_attribute("id") for a in articles] == \
        sorted(created, key=lambda j: (created[j], j), reverse=True)   # newest first
    # track_one's cover (from its bundle) is shown
    cover = browser.find_element("css selector", "article#track_one img.cover")
    deadline = time.time() + 15
    while browser.execute_script("return arguments[0].naturalWidth", cover) == 0:
        assert time.time() < deadline, "cover did not load"
        time.sleep(0.2)
    assert browser.execute_script("return arguments[0].naturalWidth", cover) == 64

    audios = browser.find_elements("tag name", "audio")
    # per track: the original and the two variants
    assert len(audios) == 6, [a.get_attribute("src") for a in audios]
    for audio in audios:
        url = browser.execute_script("return arguments[0].currentSrc", audio)
        assert url.startswith(f"{media_server}/"), url
        path = _file_for(settings, url)
        job_id = path.relative_to(settings.paths.outputs_dir if url.startswith(
            f"{media_server}/outputs/") else settings.paths.library_dir).parts[0]
        track = json.loads((settings.paths.outputs_dir / job_id / "manifest.json").read_text())
        track_s = track["provenance"]["source"]["duration_s"]
        duration, seekable_end = _wait_for_metadata(browser, audio)
        assert abs(duration - track_s) <= 0.1, (url, duration, track_s)
        assert abs(duration - probe(path)["duration_s"]) <= 0.1, (url, duration)
        # HTTP Range: the browser can seek anywhere in the file
        assert seekable_end is not None and seekable_end >= duration - 0.1, (url, seekable_end)
    # the instrumental link of the page = the metadata link
    page_urls = {browser.execute_script("return arguments[0].currentSrc", a) for a in audios}
    assert set(links.values()) <= page_urls
    browser.save_screenshot(str(tmp_path / "library_page.png"))
    assert (tmp_path / "library_page.png").stat().st_size > 10_000
    os.environ.get("IMAKER_KEEP_SCREENSHOTS") and shutil.copytree(
        tmp_path, os.environ["IMAKER_KEEP_SCREENSHOTS"], dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("chrome", "data", "dagster_home"))
