"""The web page, started as the README says and driven in headless Chromium (Debian's build).

Set WEBAPP_SCREENSHOT=docs/webapp.png to also save the screenshot there.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_files(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*")
            if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def server(trained_project, tmp_path_factory):
    """`python -m cxrlab.cli.page` on a free port; yields its URL, stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("webapp") / "server.log"
    home = tmp_path_factory.mktemp("home")  # Streamlit's own settings folder, not the user's
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cxrlab.cli.page", "--port", str(port)], cwd=trained_project,
                                env=env({"HOME": str(home)}), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the web page did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """A page of headless Chromium with a fresh profile."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1500})
        try:
            yield context.new_page()
        finally:
            context.close()


def open_page(page, url: str) -> None:
    page.goto(url)
    playwright_api.expect(page.get_by_text("Test metrics of baseline")).to_be_visible(timeout=TIMEOUT_MS)


def test_upload_shows_prediction_heatmap_and_metrics(server, browser_page, trained_project, tmp_path):
    url, log = server
    assert f"webapp: {url}" in log.read_text()  # 127.0.0.1 unless --address says otherwise
    page, expect = browser_page, playwright_api.expect
    before = project_files(trained_project)
    open_page(page, url)
    expect(page.get_by_text("Accuracy", exact=True)).to_be_visible()
    expect(page.get_by_text("Operating threshold on p(TB)")).to_be_visible()

    xray = sorted((trained_project / "data/dataset/test/TB").iterdir())[0]
    page.locator('input[type="file"]').set_input_files(str(xray))
    expect(page.get_by_text("Decision:")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_text("p(TB) = ")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_text("Grad-CAM: where the model sees TB")).to_be_visible()
    expect(page.locator('[data-testid="stImage"] img')).to_have_count(2)

    with open(trained_project / "metrics/evaluate/baseline/predictions.csv", newline="") as f:
        evaluated = {r["filename"]: r for r in csv.DictReader(f)}[xray.name]
    assert page.get_by_text("Decision:").inner_text().strip() == f"Decision: {evaluated['best_decision']}"
    shown = page.get_by_text("p(TB) = ").inner_text()
    # runtime.inference_precision: auto scores in bf16 on a CPU with native bf16: within 0.01 of evaluate's fp32
    bf16 = page.get_by_text("scored in bf16").count() > 0
    expect(page.get_by_text("scored in bf16" if bf16 else "scored in fp32")).to_be_visible()
    assert float(shown.split("=")[1]) == pytest.approx(float(evaluated["best_prob_TB"]), abs=0.01 if bf16 else 1e-3)

    page.wait_for_timeout(500)  # let images and progress bars finish drawing
    screenshot = tmp_path / "webapp.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("WEBAPP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["WEBAPP_SCREENSHOT"])
    assert project_files(trained_project) == before  # the upload was not written into the project


def test_a_bad_upload_shows_an_error_not_a_crash(server, browser_page, tmp_path):
    url, _ = server
    page, expect = browser_page, playwright_api.expect
    fake = tmp_path / "scan.png"
    fake.write_text("this is a text file, not an X-ray")
    open_page(page, url)
    page.locator('input[type="file"]').set_input_files(str(fake))
    error = page.locator('[data-testid="stAlert"]').filter(has_text="scan.png: not a readable image")
    expect(error).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    expect(page.get_by_text("Test metrics of baseline")).to_be_visible()  # the rest of the page still renders
