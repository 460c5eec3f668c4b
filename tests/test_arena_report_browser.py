"""Render an arena report (synthetic runs) in headless Chromium: the DOM has the results table and
every plot, each <img> decodes to a non-empty PNG, the browser itself decoded every image (WebDriver
naturalWidth), and the screenshot is not blank.

Chromium comes from the Debian packages ``chromium`` and ``chromium-driver``, installed with apt-get
when absent (we run as root in CI). The test skips, saying why, only when they cannot be installed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _load_arena_fixtures():
    """tests/test_arena.py builds the synthetic arena; load it by path so any pytest import mode works."""
    spec = importlib.util.spec_from_file_location("arena_fixtures", Path(__file__).with_name("test_arena.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str | None]:
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if browser and driver:
        return browser, driver
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and apt-get is not available to install it")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                       check=True, capture_output=True, timeout=1200, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        output = getattr(err, "stderr", b"") or b""
        pytest.skip(f"could not install Chromium with apt-get: {err}; {output.decode(errors='replace')[-300:]}")
    browser = _find("chromium", "chromium-browser")
    if not browser:
        pytest.skip("apt-get installed the chromium package but no chromium binary is on PATH")
    return browser, _find("chromedriver")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arena")
    arena_dir = _load_arena_fixtures().build_synthetic_arena(root)
    return arena_dir / "report.html"


def _run_chromium(browser: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, timeout=120)


def test_dom_has_table_and_every_plot(chromium, report, tmp_path):
    browser, _ = chromium
    result = _run_chromium(browser, "--dump-dom", report.as_uri(), tmp=tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    dom = result.stdout.decode()
    tree = _load_arena_fixtures()._Report()  # the non-browser tests' parser, here on the rendered DOM
    tree.feed(dom)
    results = tree.tables["results"]
    assert [row[0] for row in results[1:]] == ["grpo", "dapo", "start model"]
    assert all(cell for cell in results[1][1:])  # every column filled for the baseline
    assert len(tree.images) == 7
    for src in tree.images:
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_screenshot_is_not_blank(chromium, report, tmp_path):
    from PIL import Image  # pillow ships with matplotlib

    browser, _ = chromium
    shot = tmp_path / "report.png"
    result = _run_chromium(browser, f"--screenshot={shot}", "--window-size=1400,2200", report.as_uri(), tmp=tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1400, 2200)
    raw = image.resize((140, 220)).tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    non_white = sum(1 for r, g, b in pixels if r + g + b < 720)
    colours = len(set(pixels))
    assert non_white > 0.05 * len(pixels), f"screenshot is nearly blank: {non_white} non-white of {len(pixels)}"
    assert colours > 50, f"screenshot has only {colours} colours"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _webdriver(port: int, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_browser_decodes_every_image(chromium, report, tmp_path):
    """Through chromedriver (plain WebDriver HTTP): each <img> finished loading with a real size."""
    browser, driver = chromium
    if not driver:
        pytest.skip("chromium-driver is not installed (chromedriver missing)")
    port = _free_port()
    process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _webdriver(port, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser, "args": CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'wd-profile'}",
                                                         "--window-size=1400,2200"]}}
        session = _webdriver(port, "POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["value"]
        sid = session["sessionId"]
        try:
            _webdriver(port, "POST", f"/session/{sid}/url", {"url": report.as_uri()})
            script = ("return Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight])"
                      ".concat([[document.querySelectorAll('#results tbody tr').length]]);")
            value = _webdriver(port, "POST", f"/session/{sid}/execute/sync", {"script": script, "args": []})["value"]
        finally:
            _webdriver(port, "DELETE", f"/session/{sid}")
    finally:
        process.terminate()
        process.wait(timeout=10)
    images, (table_rows,) = value[:-1], value[-1]
    assert table_rows == 3  # grpo, dapo and the start model
    assert len(images) == 7
    for image_id, complete, width, height in images:
        assert complete and width >= 300 and height >= 200, (image_id, width, height)
