"""The search page in a real browser: Debian's chromium driven by Playwright, against a real
uvicorn server. Skips only when chromium is not installed, and fails then where
VLSEARCH_REQUIRE_BROWSER=1 (CI installs chromium and sets it: see .ci/run)."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from PIL import Image
from prerequisites import chromium_path
from serve_support import make_collections

from indexing.build import build_index
from indexing.embed import EmbedConfig, embed
from vlsearch.app.serve import ServeConfig, background_server, create_app
from vlsearch.data.shapes import ShapesConfig, generate_shapes
from vlsearch.query.filters import FilterEngine
from vlsearch.store.arrays import embedding_array
from vlsearch.store.collection import Collection
from vlsearch.query.searcher import Searcher
from vlsearch.query.terms import Item

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    """First, before the collections are built: skip the module without chromium (fail it in CI)."""
    return chromium_path()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_encoder):
    colls = make_collections(tmp_path_factory.mktemp("page"), tiny_encoder)
    app = create_app({name: str(path) for name, path in colls.items()}, ServeConfig(log_level="warning"))
    searcher = Searcher.open(colls["manifest"], encoder=tiny_encoder)
    with background_server(app) as url:
        yield url, colls, searcher, app


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _result_ids(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.id)")]


def _wait_thumbnails(page) -> None:
    page.wait_for_selector("#results li img")
    page.wait_for_function("Array.from(document.querySelectorAll('#results img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")


def _wait_new_results(page, before: list[int]) -> None:
    page.wait_for_function("before => { const ids = Array.from(document.querySelectorAll('#results li'))"
                           ".map(e => e.dataset.id); return ids.length > 0 && ids.join() !== before.join(); }",
                           arg=[str(i) for i in before])


def test_search_more_like_this_upload_and_errors_in_a_real_browser(setup, browser):
    url, colls, searcher, _ = setup
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#collection option[value=manifest]", state="attached")
    assert page.is_hidden("#token-row") and page.is_hidden("#error")  # no token needed, no error yet
    page.select_option("#collection", "manifest")
    page.fill("#k", "6")

    # 1. type a query (submitted with the keyboard) and wait for thumbnails
    page.fill("#query", "a large red circle")
    page.press("#query", "Enter")
    _wait_thumbnails(page)
    expected = searcher.search_text("a large red circle", k=6)
    assert _result_ids(page) == [h.id for h in expected]
    captions = page.eval_on_selector_all("#results .caption", "els => els.map(e => e.textContent)")
    assert captions == [h.caption for h in expected]
    assert " ms" in page.text_content("#status") and "6 results" in page.text_content("#status")
    href = page.get_attribute("#results li:first-child a", "href")
    assert page.request.get(url + href).headers["content-type"] == "image/jpeg"  # "open image" works

    # 2. scroll/page for more results: the button appends the next page
    page.click("#more")
    page.wait_for_function("document.querySelectorAll('#results li').length >= 12")
    assert _result_ids(page)[:6] == [h.id for h in expected]

    # 3. click a result: "more like this" (from the keyboard: focus it and press Enter)
    first = _result_ids(page)[0]
    before = _result_ids(page)
    page.focus("#results li:first-child .thumb")
    page.keyboard.press("Enter")
    _wait_new_results(page, before)
    _wait_thumbnails(page)
    assert "More like" in page.text_content("#query-info") and first not in _result_ids(page)

    # 4. upload a photo (the file picker) and drop one on the page
    image = Path(Collection.open(colls["manifest"]).manifest.source["path"]).parent / "images" / "000005.jpg"
    before = _result_ids(page)
    page.set_input_files("#photo", str(image))
    _wait_new_results(page, before)
    assert "your photo" in page.text_content("#query-info")
    assert _result_ids(page) == [h.id for h in searcher.search_image(image, k=6)]
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 20, 220)).save(out, format="PNG")
    before = _result_ids(page)
    transfer = page.evaluate_handle(
        "b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0)); const dt = new DataTransfer();"
        " dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'})); return dt; }",
        base64.b64encode(out.getvalue()).decode())
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    _wait_new_results(page, before)
    assert "dropped.png" in page.text_content("#query-info")

    # 5. an error (a text file as the photo) is shown to the person, not swallowed
    page.set_input_files("#photo", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    page.wait_for_selector("#error:not([hidden])")
    assert "not a usable image" in page.text_content("#error")
    assert page.get_attribute("#error", "role") == "alert" and "failed" in page.text_content("#status")

    # 6. phone width: no sideways scrolling, the search still works
    page.set_viewport_size({"width": 375, "height": 740})
    page.fill("#query", "a small blue star")
    page.click("#search-button")
    _wait_thumbnails(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.is_hidden("#error")
    assert not problems, problems
    page.close()


def _search(page, text: str) -> list[int]:
    before = _result_ids(page)
    page.fill("#query", text)
    page.press("#query", "Enter")
    _wait_new_results(page, before)
    _wait_thumbnails(page)
    return _result_ids(page)


def test_less_and_more_like_this_steer_the_query_in_place_with_removable_chips(setup, browser):
    url, _, searcher, _ = setup
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#collection option[value=manifest]", state="attached")
    page.select_option("#collection", "manifest")
    page.fill("#k", "6")
    text = "a large red circle"
    plain = _search(page, text)
    assert plain == [h.id for h in searcher.search_text(text, k=6)]

    # 1. "less like this" on the second hit: that hit leaves the list, a "less like" chip appears,
    #    and the list is the server's answer to the weighted terms (text +1, item -0.5)
    disliked = plain[1]
    page.click(f"#results li[data-id='{disliked}'] button.steer[title='Less like this']")
    chip = page.locator(f"#query-info .chip.minus[data-id='{disliked}']")
    chip.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("id => !Array.from(document.querySelectorAll('#results li')).some(e => e.dataset.id === id)"
                           " && document.querySelectorAll('#results li').length === 6", arg=str(disliked))
    _wait_thumbnails(page)
    steered = _result_ids(page)
    assert disliked not in steered
    assert steered == [h.id for h in searcher.search([(text, 1.0), (Item(disliked), -0.5)], k=6)]
    assert "Less like" in chip.text_content() and "−0.5" in chip.text_content()
    assert "Words: " + text in page.text_content("#query-info")  # the words stay a term

    # 2. "more like this" on another hit adds a +1 chip; the three terms are searched together
    liked = steered[2]
    page.click(f"#results li[data-id='{liked}'] button.steer[title='More like this']")
    page.locator(f"#query-info .chip.plus[data-id='{liked}']").wait_for(state="visible", timeout=10_000)
    expected = [h.id for h in searcher.search([(text, 1.0), (Item(disliked), -0.5), (Item(liked), 1.0)], k=6)]
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=[str(i) for i in expected], timeout=10_000)

    # 3. removing the chips (their x buttons) brings back the plain query's list
    page.click(f"#query-info .chip[data-id='{liked}'] button.remove")
    page.locator(f"#query-info .chip[data-id='{liked}']").wait_for(state="detached", timeout=10_000)
    page.click(f"#query-info .chip[data-id='{disliked}'] button.remove")
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=[str(i) for i in plain], timeout=10_000)
    assert page.locator("#query-info .chip").count() == 1
    assert page.get_attribute(f"#results li[data-id='{plain[0]}'] button.steer[title='Less like this']",
                              "aria-label").startswith("Less like this: ")
    assert page.is_hidden("#error") and not problems, problems
    page.close()


def test_with_a_token_the_page_asks_for_it_and_then_shows_images(setup, browser, tiny_encoder):
    _, colls, searcher, _ = setup
    token = "page-token-0123456789abcdef"
    app = create_app({"manifest": Searcher.open(colls["manifest"], encoder=tiny_encoder)},
                     ServeConfig(token=token, log_level="warning"))
    with background_server(app) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#token-row:not([hidden])")
        assert "token" in page.text_content("#error")
        page.fill("#token", token)
        page.click("#token-save")
        page.wait_for_selector("#collection option[value=manifest]", state="attached")
        page.fill("#k", "4")
        page.fill("#query", "a yellow triangle")
        page.press("#query", "Enter")
        _wait_thumbnails(page)  # fetched with the Authorization header (blob URLs)
        assert _result_ids(page) == [h.id for h in searcher.search_text("a yellow triangle", k=4)]
        assert page.eval_on_selector("#results img", "i => i.src").startswith("blob:")
        page.close()


def _shapes(root: Path, n: int) -> tuple[Path, dict[str, dict], dict[str, str]]:
    """``n`` generated shape JPEGs: their folder, each image's attributes and its first caption."""
    split = generate_shapes(root / "shapes", ShapesConfig(n_train=0, n_heldout=n, image_format="jpg")).split_dir("heldout")
    with open(split / "attributes.csv", newline="") as f:
        attributes = {row["image"]: row for row in csv.DictReader(f)}
    captions: dict[str, str] = {}
    with open(split / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], row["caption"])
    return split, attributes, captions


def _embed_with_index(root: Path, encoder) -> Path:
    """``root/src/captions.csv`` embedded into ``root/coll`` with the tiny model, and a Flat index."""
    config = EmbedConfig(model=encoder.info.name, workers=0, batch_size=16, shard_size=16, device="cpu")
    coll = embed(root / "src" / "captions.csv", root / "coll", config, encoder=encoder).path
    build_index(coll, index_type="Flat")
    return coll


@pytest.fixture(scope="module")
def steering(tmp_path_factory, tiny_encoder):
    """A manifest collection of shapes in one folder per shape kind, with a ``color`` column and one
    file whose name holds a word no caption has (``quokka``): a keyword-only match."""
    root = tmp_path_factory.mktemp("steer")
    split, attributes, captions = _shapes(root, 24)
    rows = []
    for i, (image, attrs) in enumerate(sorted(attributes.items())):
        name = f"{attrs['shape']}/{'quokka' if i == 5 else Path(image).stem}.jpg"
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(split / image, root / "src" / name)
        rows.append((name, captions[image], attrs["color"]))
    pcsv.write_csv(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows],
                             "color": [r[2] for r in rows]}), root / "src" / "captions.csv")
    coll = _embed_with_index(root, tiny_encoder)
    app = create_app({"steer": str(coll)}, ServeConfig(log_level="warning"))
    with background_server(app) as url:
        yield url, Searcher.open(coll, encoder=tiny_encoder), rows[5][0]


def _open(browser, url: str, problems: list[str], k: int = 6):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#collection option[value=steer]", state="attached")
    page.fill("#k", str(k))
    return page


def test_keyword_mode_finds_a_file_name_word_that_vector_search_misses(steering, browser):
    url, searcher, quokka = steering
    problems: list[str] = []
    page = _open(browser, url, problems)
    by_vector = _search(page, "quokka")
    assert by_vector == [h.id for h in searcher.search_text("quokka", k=6)]
    target = next(h.id for h in searcher.search_text("quokka", k=1, mode="keyword"))
    assert searcher.search_text("quokka", k=1, mode="keyword")[0].path == quokka
    assert by_vector[0] != target  # the tiny model does not know the word: only the file name has it
    page.select_option("#match", "keyword")
    page.wait_for_function("id => { const li = document.querySelector('#results li'); return li && li.dataset.id === id; }",
                           arg=str(target), timeout=10_000)
    assert _result_ids(page) == [h.id for h in searcher.search_text("quokka", k=6, mode="keyword")]
    assert "keyword" in page.text_content("#status")
    page.select_option("#match", "hybrid")  # both lists fused: the keyword match is still in it
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('hybrid')", timeout=10_000)
    assert _result_ids(page) == [h.id for h in searcher.search_text("quokka", k=6, mode="hybrid")]
    assert target in _result_ids(page)
    page.select_option("#match", "keyword")  # bad keyword syntax: a message, not a crash
    # the mode change searches by itself: wait for its answer (a second "quokka" search would show the same ids)
    page.wait_for_function("id => document.querySelector('#status').textContent.includes('keyword')"
                           " && document.querySelector('#results li')?.dataset.id === id", arg=str(target), timeout=10_000)
    page.fill("#query", '"unclosed phrase')
    page.press("#query", "Enter")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "keyword" in page.text_content("#error")
    assert not problems, problems
    page.close()


def test_a_facet_click_filters_the_hits_to_its_value_and_the_filter_chip_removes_it(steering, browser):
    url, searcher, _ = steering
    problems: list[str] = []
    page = _open(browser, url, problems, k=8)
    text = "a small shape"
    _search(page, text)
    page.wait_for_selector("#facets:not([hidden]) .facet[data-column=color] button", timeout=10_000)
    facets = searcher.search_text(text, k=8, facets=["color", "folder"]).facets
    color, count = next(iter(facets["color"].items()))  # the most frequent colour among the matches
    button = page.locator(f".facet[data-column=color] button[data-value='{color}']")
    assert button.text_content() == f"{color} ({count})"
    before = _result_ids(page)
    button.click()
    _wait_new_results(page, before)
    expected = searcher.search_text(text, k=8, where=f"color = '{color}'")
    assert _result_ids(page) == [h.id for h in expected] and len(expected) == min(8, count)
    assert all(color in c for c in page.eval_on_selector_all("#results .caption", "els => els.map(e => e.textContent)"))
    chip = page.locator("#filters .chip[data-column=color]")
    assert chip.is_visible() and f"color: {color}" in chip.text_content()
    assert page.locator(".facet[data-column=color]").count() == 0  # the filtered column is not offered again

    # a folder facet (the directory part of the path) narrows too, on top of the colour
    folder_button = page.locator(".facet[data-column=folder] button").first
    folder = folder_button.get_attribute("data-value")
    before = _result_ids(page)
    folder_button.click()
    _wait_new_results(page, before)
    assert {p.split("/")[0] for p in page.eval_on_selector_all("#results .path", "els => els.map(e => e.textContent)")} \
        == {folder}

    page.click("#filters .chip[data-column=color] button.remove")
    page.click("#filters .chip[data-column=folder] button.remove")
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=[str(h.id) for h in searcher.search_text(text, k=8)],
                           timeout=10_000)
    assert page.is_hidden("#filters") and not problems, problems

    # autocut: the list ends at the first drop in score (here a shorter list); the page counts facets,
    # so the cut is made on the deeper candidate list that facets fetch
    page.check("#autocut")
    cut = [str(h.id) for h in searcher.search_text(text, k=8, autocut=1, facets=["color", "folder"])]
    assert 0 < len(cut) < 8
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=cut, timeout=10_000)
    page.uncheck("#autocut")

    # the conditions a click builds take names and values as data: quotes and GLOB characters too
    tricky = ["it's", 'say "hi"', "a*b?[c]\\d", "x/y", ""]
    table = pa.table({"id": list(range(len(tricky))), "path": [f"{v}/p.jpg" if v else "p.jpg" for v in tricky],
                      "color": tricky, "folder": tricky})  # the stored folder column embed writes
    engine = FilterEngine(table)
    for i, value in enumerate(tricky):
        for column in ("color", "folder"):
            where = page.evaluate("([c, v]) => condition(c, v)", [column, value])
            assert engine.matching_ids(engine.compile(where)).tolist() == [i], (column, value, where)
    assert page.evaluate("condition('odd\"name', 3)") == '"odd""name" = 3'
    page.close()


#: what the page sends as `facets` for the steer collection (its `facets` list: text columns, EXIF ones included)
FACETS = ["color", "camera_make", "camera_model", "lens", "folder"]


def _scores(page) -> list[float]:
    texts = page.eval_on_selector_all("#results .score", "els => els.map(e => e.textContent)")
    return [float(t.split("·")[1]) for t in texts]


def test_sort_and_group_controls_give_the_library_s_ordered_grouped_list(steering, browser):
    url, searcher, _ = steering
    problems: list[str] = []
    page = _open(browser, url, problems, k=8)
    assert page.is_visible("#shape-row") and page.get_attribute("#order-dir", "aria-pressed") == "true"
    options = page.eval_on_selector_all("#order-by option", "els => els.map(e => e.value)")
    assert options[0] == "" and "color" in options
    assert page.eval_on_selector_all("#group-by option", "els => els.map(e => e.value)") == [""] + FACETS
    page.select_option("#order-by", "color")
    page.select_option("#group-by", "folder")
    page.fill("#per-group", "2")
    text = "a small shape"
    shown = _search(page, text)
    expected = searcher.search_text(text, k=8, order_by="color DESC", group_by="folder", per_group=2, facets=FACETS)
    assert shown == [h.id for h in expected]
    folders = [p.split("/")[0] for p in page.eval_on_selector_all("#results .path", "els => els.map(e => e.textContent)")]
    assert max(folders.count(f) for f in folders) <= 2
    page.focus("#order-dir")  # the direction toggle, from the keyboard: smallest first
    page.keyboard.press("Enter")
    ascending = [str(h.id) for h in searcher.search_text(text, k=8, order_by="color ASC", group_by="folder",
                                                           per_group=2, facets=FACETS)]
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=ascending, timeout=10_000)
    assert page.get_attribute("#order-dir", "aria-pressed") == "false"
    assert page.is_hidden("#error") and not problems, problems
    page.close()


def test_min_score_shows_only_hits_scoring_at_least_it(steering, browser):
    url, searcher, _ = steering
    problems: list[str] = []
    page = _open(browser, url, problems, k=10)
    text = "a large red circle"
    threshold = round(searcher.search_text(text, k=10)[3].score, 3)
    assert "model" in page.get_attribute("#min-score", "title")
    page.fill("#min-score", str(threshold))
    shown = _search(page, text)
    expected = searcher.search_text(text, k=10, min_score=threshold, facets=FACETS)
    assert shown == [h.id for h in expected] and 0 < len(shown) < 10
    assert all(s >= threshold for s in _scores(page))
    assert page.is_hidden("#error") and not problems, problems
    page.close()


def test_hybrid_alpha_blends_the_scores_like_the_library(steering, browser):
    url, searcher, _ = steering
    problems: list[str] = []
    page = _open(browser, url, problems)
    assert page.is_hidden("#alpha-row")
    page.select_option("#match", "hybrid")
    assert page.is_visible("#alpha-row")
    page.fill("#alpha", "0.7")
    text = "quokka red"
    shown = _search(page, text)
    expected = searcher.search_text(text, k=6, mode="hybrid", alpha=0.7, facets=FACETS)
    assert shown == [h.id for h in expected]
    # the blended scores, not the rank-fusion ones (about 1/60 each), are shown
    assert _scores(page) == pytest.approx([round(h.score, 3) for h in expected], abs=1e-3)
    assert "hybrid" in page.text_content("#status")
    assert page.is_hidden("#error") and not problems, problems
    page.close()


#: the UTC shooting time of the photos fixture's first row (one day later for each next dated row)
TAKEN = dt.datetime(2024, 6, 14, 15, 30, tzinfo=dt.timezone.utc)
#: every tagged row's tags after its shape and colour: six in all, one holding a quote (tags are data)
EXTRA_TAGS = ["dad's car", "outdoor", "daylight", "blurry"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_encoder):
    """A photo library: shapes under ``roll/`` plus exact copies of four under ``copies/`` (near-duplicate
    pairs), with ``taken_at`` and a camera on even rows and auto-tags (shape, colour, EXTRA_TAGS, with
    decreasing scores) on three rows in four, written as a new version by ``Collection.set_columns``."""
    root = tmp_path_factory.mktemp("photos")
    split, attributes, captions = _shapes(root, 16)
    rows = []
    for i, image in enumerate(sorted(attributes)):
        for folder in ("roll", "copies") if i < 4 else ("roll",):
            name = f"{folder}/{Path(image).stem}.jpg"
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(split / image, root / "src" / name)
            rows.append((name, captions[image], attributes[image]))
    pcsv.write_csv(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), root / "src" / "captions.csv")
    coll = Collection.open(_embed_with_index(root, tiny_encoder))
    _spread(coll, tiny_encoder.info.dim)
    stored = coll.read_table(columns=["id", "path"]).to_pydict()
    by_path = dict(zip(stored["path"], stored["id"]))
    values: dict[str, list] = {"id": [], "taken_at": [], "camera_make": [], "camera_model": [], "tags": [],
                               "tag_scores": []}
    for i, (name, _, attrs) in enumerate(rows):
        values["id"].append(by_path[name])
        values["taken_at"].append(TAKEN + dt.timedelta(days=i) if i % 2 == 0 else None)
        values["camera_make"].append("Canon" if i % 2 == 0 else None)
        values["camera_model"].append("Canon EOS R5" if i % 2 == 0 else None)
        tags = None if i % 4 == 3 else [attrs["shape"], attrs["color"], *EXTRA_TAGS]
        values["tags"].append(tags)
        values["tag_scores"].append(None if tags is None else [round(0.4 - 0.02 * j, 2) for j in range(len(tags))])
    coll.set_columns(pa.table({**values, "id": pa.array(values["id"], pa.int64()),
                               "taken_at": pa.array(values["taken_at"], pa.timestamp("us", tz="UTC")),
                               "tags": pa.array(values["tags"], pa.list_(pa.string())),
                               "tag_scores": pa.array(values["tag_scores"], pa.list_(pa.float32()))}))
    app = create_app({"photos": str(coll.path)}, ServeConfig(log_level="warning"))
    with background_server(app) as url:
        yield url, Searcher.open(coll.path, encoder=tiny_encoder), root / "src"


def _spread(coll: Collection, dim: int) -> None:
    """Give each distinct picture its own random vector, shared by its copies: the random-weight tiny
    model finds all the shapes alike (cosine >= 0.94 chains them into one near-duplicate group), which
    would leave a dedup test one hit to compare. The rows come back under new ids, as a new version."""
    table = coll.read_table()
    hashes = [Path(p).name for p in table.column("path").to_pylist()]  # a copy keeps its file name
    rng = np.random.default_rng(0)
    vectors = {h: rng.standard_normal(dim).astype(np.float32) for h in dict.fromkeys(hashes)}
    x = np.stack([vectors[h] / np.linalg.norm(vectors[h]) for h in hashes])
    moved = table.set_column(table.schema.get_field_index("embedding"), "embedding", embedding_array(x))
    moved = moved.set_column(0, "id", pa.array(table.column("id").to_numpy() + 1000, pa.int64()))
    with coll.update() as u:
        u.remove(table.column("id").to_pylist())
        u.add(moved)


def _open_photos(browser, url: str, problems: list[str], k: int = 8):
    """The page on the photos collection, in Paris time (summer: UTC+2) with British date formats."""
    context = browser.new_context(viewport={"width": 1200, "height": 900}, timezone_id="Europe/Paris", locale="en-GB")
    page = context.new_page()
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#collection option[value=photos]", state="attached")
    page.fill("#k", str(k))
    return page


def _facets(page) -> list[str]:
    """What the page sends as `facets` (the collection's `facets` list), to ask the library the same."""
    return page.evaluate("state.collections.photos.facets")


def test_cards_show_when_and_with_what_a_photo_was_taken_and_its_tags(photos, browser):
    url, searcher, _ = photos
    problems: list[str] = []
    page = _open_photos(browser, url, problems)
    info = page.evaluate("state.collections.photos")
    assert "taken_at" in info["columns"] and {"tags", "captions"} <= set(info["list_columns"])
    options = page.eval_on_selector_all("#order-by option", "els => els.map(e => e.value)")
    assert "taken_at" in options and "tags" not in options and "captions" not in options  # lists cannot be sorted
    assert "tags" not in page.eval_on_selector_all("#group-by option", "els => els.map(e => e.value)")
    text = "a large red circle"
    shown = _search(page, text)
    expected = searcher.search_text(text, k=8, facets=_facets(page))
    assert shown == [h.id for h in expected]
    for hit in expected:
        card = page.locator(f"#results li[data-id='{hit.id}']")
        taken = hit.metadata["taken_at"]
        if taken is None:
            assert card.locator("time.taken").count() == 0 and card.locator(".camera").count() == 0
        else:
            time = card.locator("time.taken")
            assert time.get_attribute("datetime") == time.get_attribute("title") == taken.isoformat()
            local = taken.astimezone(dt.timezone(dt.timedelta(hours=2)))  # Paris in June
            assert time.text_content() == f"{local.day} {local:%b %Y, %H:%M}"
            assert card.locator(".camera").text_content() == "Canon EOS R5"  # the make is not said twice
        tags = hit.metadata["tags"]
        chips = card.locator(".tags button.tag")
        if tags is None:
            assert chips.count() == 0
        else:
            assert chips.all_text_contents() == tags[:5] and len(tags) == 6  # at most five
            assert chips.first.get_attribute("title") == f"score {hit.metadata['tag_scores'][0]:.3f}"
    assert any(h.metadata["taken_at"] for h in expected) and any(h.metadata["taken_at"] is None for h in expected)

    page.set_viewport_size({"width": 375, "height": 740})  # phone width: the chips wrap, no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.set_viewport_size({"width": 1200, "height": 900})

    # sorting by taken_at gives the library's newest-first list
    page.select_option("#order-by", "taken_at")
    newest = [str(h.id) for h in searcher.search_text(text, k=8, order_by="taken_at DESC", facets=_facets(page))]
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=newest, timeout=10_000)
    assert page.is_hidden("#error") and not problems, problems
    page.context.close()


def test_a_tag_chip_filters_the_hits_to_that_tag_like_a_facet_value(photos, browser):
    url, searcher, _ = photos
    problems: list[str] = []
    page = _open_photos(browser, url, problems)
    text = "a small blue square"
    _search(page, text)
    facets = _facets(page)
    tagged = next(h for h in searcher.search_text(text, k=8, facets=facets) if h.metadata["tags"])
    tag = tagged.metadata["tags"][0]  # its shape: some rows have it, others not
    before = _result_ids(page)
    page.click(f"#results li[data-id='{tagged.id}'] button.tag[data-tag='{tag}']")
    _wait_new_results(page, before)
    expected = searcher.search_text(text, k=8, where=f"list_contains(tags, '{tag}')", facets=facets)
    assert _result_ids(page) == [h.id for h in expected] and all(tag in h.metadata["tags"] for h in expected)
    assert 0 < len(expected) and len(expected) < sum(1 for _ in searcher.search_text(text, k=8))
    chip = page.locator("#filters .chip[data-column=tags]")
    assert f"tags: {tag}" in chip.text_content()
    page.click("#filters .chip[data-column=tags] button.remove")
    page.wait_for_selector("#filters", state="hidden")
    _wait_ids(page, searcher.search_text(text, k=8, facets=facets))  # the removal's own search answered first

    # a tag holding a quote is data: the chip's filter finds exactly the rows with it
    quoted = page.locator(f"#results li[data-id='{tagged.id}'] button.tag[data-tag=\"dad's car\"]")
    before = _result_ids(page)
    quoted.click()
    _wait_new_results(page, before)
    expected = searcher.search_text(text, k=8, where="list_contains(tags, 'dad''s car')", facets=facets)
    assert _result_ids(page) == [h.id for h in expected] and all(h.metadata["tags"] for h in expected)

    # a value of the tags facet is filtered the same way (one condition for chips and facets)
    page.click("#filters .chip[data-column=tags] button.remove")
    _wait_ids(page, searcher.search_text(text, k=8, facets=facets))
    page.wait_for_selector("#facets .facet[data-column=tags] button", timeout=10_000)
    counts = searcher.search_text(text, k=8, facets=facets).facets["tags"]
    value = next(t for t, n in counts.items() if t is not None and "'" not in t and n < max(counts.values()))
    before = _result_ids(page)
    page.click(f".facet[data-column=tags] button[data-value='{value}']")
    _wait_new_results(page, before)
    expected = searcher.search_text(text, k=8, where=f"list_contains(tags, '{value}')", facets=facets)
    assert _result_ids(page) == [h.id for h in expected] and f"tags: {value}" in page.text_content("#filters")
    tricky = ["it's", 'say "hi"', "a*b?[c]\\d", ""]
    engine = FilterEngine(pa.table({"id": list(range(len(tricky))), "tags": [[v, "x"] for v in tricky]}))
    for i, value in enumerate(tricky):
        where = page.evaluate("v => condition('tags', v)", value)
        assert engine.matching_ids(engine.compile(where)).tolist() == [i], (value, where)
    assert page.is_hidden("#error") and not problems, problems
    page.context.close()


def _wait_ids(page, hits) -> None:
    """Wait until the page lists these hits (the library's answer), in order."""
    page.wait_for_function("ids => Array.from(document.querySelectorAll('#results li')).map(e => e.dataset.id)"
                           ".join() === ids.join()", arg=[str(h if isinstance(h, int) else h.id) for h in hits],
                           timeout=10_000)


def _bodies(page, sent: list) -> None:
    page.on("request", lambda r: sent.append(r) if "/search" in r.url and r.method == "POST" else None)


def test_the_dedup_toggle_collapses_near_duplicates_on_every_kind_of_search(photos, browser):
    url, searcher, src = photos
    problems: list[str] = []
    page = _open_photos(browser, url, problems)
    sent: list = []
    _bodies(page, sent)
    assert not page.is_checked("#dedup")  # off by default
    text = "a large red circle"
    facets = _facets(page)
    plain = _search(page, text)
    assert plain == [h.id for h in searcher.search_text(text, k=8, facets=facets)]
    assert "dedup" not in json.loads(sent[-1].post_data)
    expected = [h.id for h in searcher.search_text(text, k=8, facets=facets, dedup=True)]
    assert expected != plain and len(expected) == 8  # the copies collapse, and the list is still full

    page.check("#dedup")  # the toggle reruns the query, with dedup
    _wait_ids(page, expected)
    assert json.loads(sent[-1].post_data)["dedup"] is True

    for mode in ("keyword", "hybrid"):  # the words again, matched as words, then both ways: dedup still sent
        page.select_option("#match", mode)
        _wait_ids(page, searcher.search_text(text, k=8, mode=mode, facets=facets, dedup=True))
        body = json.loads(sent[-1].post_data)
        assert body["mode"] == mode and body["dedup"] is True
    page.select_option("#match", "vector")
    _wait_ids(page, expected)

    # "more like this" (weighted terms) and a photo upload send it too
    liked = _result_ids(page)[1]
    page.click(f"#results li[data-id='{liked}'] button.steer[title='More like this']")
    _wait_ids(page, searcher.search([(text, 1.0), (Item(liked), 1.0)], k=8, facets=facets, dedup=True))
    body = json.loads(sent[-1].post_data)
    assert body["dedup"] is True and len(body["terms"]) == 2
    image = src / "copies" / sorted(p.name for p in (src / "copies").iterdir())[0]
    before = _result_ids(page)
    page.set_input_files("#photo", str(image))
    _wait_new_results(page, before)
    assert sent[-1].url.endswith("/search/image")  # a form with a file: its fields are not readable here,
    deduped = [h.id for h in searcher.search_image(image, k=8, facets=facets, dedup=True)]  # so tell by the hits
    assert _result_ids(page) == deduped != [h.id for h in searcher.search_image(image, k=8, facets=facets)]
    assert page.is_hidden("#error") and not problems, problems
    page.context.close()
