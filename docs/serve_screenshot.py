"""Make ``docs/serve.png``: the search page with real results, shot in headless chromium.

Indexes ``../shared/data/flickr8k-test`` (1,000 photos, 5 captions each) with the default model
into ``bench-data/flickr8k-test-default`` once (a few minutes on 2 cores), serves it on
127.0.0.1, types a query and saves the page. Needs Debian's chromium and Playwright.

    python docs/serve_screenshot.py ["a dog running on the grass"]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "flickr8k-test" / "captions.csv"
COLLECTION = ROOT / "bench-data" / "flickr8k-test-default"
OUT = ROOT / "docs" / "serve.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(query: str = "a dog running on the grass") -> None:
    from playwright.sync_api import sync_playwright

    from indexing.build import build_index
    from indexing.embed import EmbedConfig, embed
    from vlsearch.app.serve import ServeConfig, background_server, create_app
    from vlsearch.store.collection import Collection

    coll = embed(DATA, COLLECTION, EmbedConfig(workers=1))
    if not coll.has_index():
        build_index(COLLECTION, index_type="auto")
    app = create_app({"flickr8k-test": str(COLLECTION)}, ServeConfig(log_level="warning"))
    with background_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_selector("#collection option", state="attached")
        page.fill("#k", "12")
        page.fill("#query", query)
        page.press("#query", "Enter")
        page.wait_for_selector("#results li img")
        page.wait_for_function("Array.from(document.querySelectorAll('#results img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(OUT), full_page=True)
        browser.close()
    print(f"{OUT} ({Collection.open(COLLECTION).manifest.model.name})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
