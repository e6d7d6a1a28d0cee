"""The page template `dvc plots show` and `dvc plots diff` fill, with Vega inside it: plots offline.

DVC's own page (dvc_render.html) loads Vega, Vega-Lite and Vega-Embed from cdn.jsdelivr.net, so without
the internet none of its interactive plots draws, and the page says nothing. `.dvc/config` points DVC
at `plots_page.html` beside this file instead (`[plots] html_template`): the same page, with the browser
builds of the same versions DVC asks the CDN for written into it, and their licences (BSD-3-Clause).

The template is made from the npm packages, never edited by hand:

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python -m cxrlab.reports.plots_page vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz

(tests/test_plots_render.py rebuilds it from the packages and checks the file is what they give.)
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

TEMPLATE = Path(__file__).with_name("plots_page.html")
ORDER = ("vega", "vega-lite", "vega-embed")  # each needs the one before


def package_build(tarball: Path) -> tuple[str, str, str, str]:
    """(name, version, browser build, licence) of an npm package tarball: the build the CDN serves."""
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("package/package.json"))
        build = tar.extractfile(f"package/{manifest['jsdelivr']}").read().decode()
        licence = tar.extractfile("package/LICENSE").read().decode()
    return manifest["name"], manifest["version"], build, licence


def page(tarballs: list[Path]) -> str:
    """DVC's page (dvc_render.html.PAGE_HTML) with the three builds inline instead of its {scripts}."""
    from dvc_render.html import PAGE_HTML

    packages = {name: (version, build, licence) for name, version, build, licence in map(package_build, tarballs)}
    if sorted(packages) != sorted(ORDER):
        raise SystemExit(f"give the npm tarballs of {', '.join(ORDER)}; got {', '.join(packages)}")
    scripts = []
    for name in ORDER:
        version, build, licence = packages[name]
        for bad in ("</script", "{plot_divs}", "{refresh_tag}"):
            if bad in build:
                raise SystemExit(f"{name}@{version}'s build holds {bad!r}: it cannot be written into the page")
        scripts.append(f"<!-- {name}@{version}, from its npm package's {name} build.\n"
                       f"{licence.strip().replace('--', '- -')}\n-->\n<script>{build}</script>")
    return PAGE_HTML.replace("{scripts}", "\n".join(scripts))


if __name__ == "__main__":
    TEMPLATE.write_text(page([Path(a) for a in sys.argv[1:]]), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size} bytes)")
