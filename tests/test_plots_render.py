"""The pages that `dvc plots show` and `dvc plots diff` write, opened in headless Chromium (Debian's build):
every script parses, every plot draws, and each figure appears once.

The pages carry Vega, Vega-Lite and Vega-Embed inside them (.dvc/config's html_template,
cxrlab/reports/plots_page.py), so they draw with the network off: every request but the page's own files is
refused. The template is checked against the npm packages of the versions DVC's page asks the CDN for
(`npm pack`, kept in pytest's cache folder). Reuses the end-to-end pipeline run and its experiment
(tests/conftest.py), so it costs seconds on its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CDN_SCRIPT = re.compile(r"https://cdn\.jsdelivr\.net/npm/((vega(?:-lite|-embed)?)@([\d.]+))")

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does",
                allow_module_level=True)

# Wrap vegaEmbed as the Vega-Embed bundle defines it: draw as SVG (so the marks are in the DOM) and keep each
# embedding's outcome, which the page itself drops (a failed embedding only logs).
RECORD_EMBEDS = """
window.__embeds = [];
let embed;
Object.defineProperty(window, "vegaEmbed", {
  configurable: true,
  get() { return embed; },
  set(original) {
    embed = (el, spec, opts) => {
      const done = original(el, spec, {...opts, renderer: "svg"});
      const title = typeof spec.title === "object" ? spec.title.text : spec.title;
      window.__embeds.push(done.then(() => [el, title, null], (e) => [el, title, String(e)]));
      return done;
    };
  },
});
"""

# Per plot div (Vega-Embed has replaced a Vega plot's script by its drawing): its text, how many data marks
# (lines, points, cells) it drew, its legends' titles, and its images' widths (0: not loaded).
DESCRIBE_PLOTS = """
() => [...document.querySelectorAll("body > div[id]")].map((div) => ({
  id: div.id,
  vega: div.querySelector("img") === null,
  text: div.querySelector("svg")?.textContent ?? "",
  marks: [...div.querySelectorAll("svg g.role-mark path")].filter((p) => (p.getAttribute("d") || "") !== "").length,
  images: [...div.querySelectorAll("img")].map((img) => img.naturalWidth),
  legends: [...div.querySelectorAll("svg .role-legend-title")].map((t) => t.textContent),
}))
"""


@pytest.fixture(scope="module")
def vega_packages(request, tmp_path_factory) -> list[Path]:
    """The npm package tarballs of the Vega, Vega-Lite and Vega-Embed versions DVC's page loads from the CDN."""
    from dvc_render.vega import VegaRenderer

    if shutil.which("npm") is None:
        pytest.skip("npm is missing: the template is checked against Vega's npm packages (install Node.js and npm)")
    plugin = getattr(request.config, "cache", None)  # pytest's cache, kept between runs, unless disabled
    cache = Path(plugin.mkdir("vega-npm-packages")) if plugin else tmp_path_factory.mktemp("vega-npm-packages")
    tarballs = []
    for match in CDN_SCRIPT.finditer(VegaRenderer.SCRIPTS):
        spec, name, version = match.groups()
        tarball = cache / f"{name}-{version}.tgz"
        if not tarball.is_file():
            proc = subprocess.run(["npm", "pack", "--silent", spec], cwd=cache, capture_output=True, text=True,
                                  timeout=300, check=False)
            if proc.returncode != 0 or not tarball.is_file():
                pytest.skip(f"npm pack {spec} failed (is the npm registry reachable?): {proc.stderr.strip()[-500:]}")
        tarballs.append(tarball)
    assert len(tarballs) == 3, VegaRenderer.SCRIPTS  # vega, vega-lite, vega-embed
    return tarballs


def test_the_offline_page_template_holds_the_versions_dvc_asks_the_cdn_for(vega_packages):
    from cxrlab.reports import plots_page

    assert plots_page.TEMPLATE.read_text(encoding="utf-8") == plots_page.page(vega_packages)
    with tarfile.open(vega_packages[0]) as tar:  # the build itself, byte for byte, not only its name
        manifest = json.load(tar.extractfile("package/package.json"))
        assert tar.extractfile(f"package/{manifest['jsdelivr']}").read().decode() in plots_page.TEMPLATE.read_text()
    assert "cdn.jsdelivr" not in plots_page.TEMPLATE.read_text() and "{plot_divs}" in plots_page.TEMPLATE.read_text()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with the network off; yields open(html) -> (plots as DESCRIBE_PLOTS plus each Vega
    plot's `title`, errors: page errors, console errors, failed embeddings, refused requests)."""
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)

        def open_page(html: Path) -> tuple[list[dict], list[str]]:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)

            def route(r):
                url = r.request.url
                if url.startswith("file://"):
                    r.continue_()
                else:
                    errors.append(f"refused request: {url}")
                    r.abort()

            page.route("**/*", route)
            page.add_init_script(RECORD_EMBEDS)
            page.goto(html.as_uri(), wait_until="load")
            embedded = page.evaluate("Promise.all(window.__embeds)")
            errors += [f"{el}: {e}" for el, _, e in embedded if e]
            plots = page.evaluate(DESCRIBE_PLOTS)
            page.close()
            titles = {el.lstrip("#"): title for el, title, _ in embedded}
            for p in plots:
                p["title"] = titles.get(p["id"]) if p["vega"] else None
            calls = html.read_text().count("vegaEmbed(")
            if len(embedded) != calls:  # a script that did not parse never calls vegaEmbed
                errors.append(f"{len(embedded)} of the page's {calls} Vega plots were embedded")
            return plots, errors

        try:
            yield open_page
        finally:
            chromium.close()


def expected_plots(project: Path) -> dict[str, int]:
    """{kind: count} of the figures dvc.yaml declares for this project's variants and ensembles."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    scored = len(params["experiments"]) + len(params["ensembles"])
    top = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    images = sum(isinstance(p, str) for p in top)
    return {"vega": 3 * scored + len(top) - images,  # confusion, ROC, precision-recall of each; the overlays
            "image": images + len(params["experiments"])}  # and a Grad-CAM gallery per variant


def check_page(plots: list[dict], errors: list[str], expected: dict[str, int], revs: int) -> None:
    assert errors == []
    vega = [p for p in plots if p["vega"]]
    images = [p for p in plots if not p["vega"]]
    assert (len(vega), len(images)) == (expected["vega"], expected["image"]), [p["id"] for p in plots]
    for p in vega:
        assert p["title"] and p["title"] in p["text"] and p["marks"] > 0, p
        assert len(p["legends"]) == len(set(p["legends"])), p  # no legend twice
    titles = [p["title"] for p in vega]
    assert len(titles) == len(set(titles))  # each figure once
    for p in images:
        assert len(p["images"]) == revs and all(width > 0 for width in p["images"]), p


def test_plots_show_and_diff_pages_render_every_plot(experimented, browser, tmp_path):
    project, _ = experimented
    expected = expected_plots(project)

    dvc("plots", "show", "-o", str(tmp_path / "show"), cwd=project)
    assert "cdn.jsdelivr.net" not in (tmp_path / "show" / "index.html").read_text()  # Vega is in the page
    plots, errors = browser(tmp_path / "show" / "index.html")
    check_page(plots, errors, expected, revs=1)
    by_title = {p["title"]: p for p in plots if p["vega"]}
    # the title with an apostrophe, which once broke the page's script (DVC writes plot ids into it unescaped)
    assert "Test F1 per epoch (the study's view, never used for selection)" in by_title
    assert by_title["Validation F1 per epoch (selects the best epoch)"]["legends"] == ["variant", "experiment"]

    experiment = dvc("exp", "ls", "--name-only", cwd=project).stdout.split()
    assert len(experiment) == 1
    dvc("plots", "diff", "HEAD", experiment[0], "-o", str(tmp_path / "diff"), cwd=project)
    plots, errors = browser(tmp_path / "diff" / "index.html")
    check_page(plots, errors, expected, revs=2)
    html = (tmp_path / "diff" / "index.html").read_text()
    assert experiment[0] in html and '"rev": "HEAD"' in html  # both revisions' data are on the page
