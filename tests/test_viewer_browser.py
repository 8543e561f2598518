"""The viewer in headless Chromium: the static site from the file system and `mine serve` on 127.0.0.1.
Pages load without console errors, the index sorts and filters, a neuron page shows the store's top
examples with the value on hover, head pages paint their patterns, hostile corpus text renders as
text (no dialog, no injected element), and screenshots are written (to $MINING_SCREENSHOTS if set)."""

import os
import threading
import time
from pathlib import Path

import pytest

from browser import chromium, console_errors, require_browser
from mining.cli import main
from mining.query import connect, run_sql

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    require_browser()
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def site(viewer_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "viewer"
    assert main(["export", str(viewer_store), "--top", "6", "--neuron", "1:7", "--format", "html", "--heads", "3",
                 "--k", "4", "--per-band", "1", "--random", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MINING_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load(driver, url: str) -> None:
    driver.get_log("browser")  # drop earlier pages' messages
    driver.get(url)
    driver.find_element("css selector", "body")


def _no_dialog(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def _column(driver, table_id: str, index: int) -> list[float]:
    cells = driver.find_elements("css selector", f"#{table_id} tbody tr:not([hidden]) td:nth-child({index})")
    return [float(c.get_attribute("data-v")) for c in cells]


def _submit(driver, form_id: str, field: str, value: str) -> None:
    """Set one field of a form, submit it and wait for the page it asks for."""
    box = driver.find_element("css selector", f"#{form_id} input[name={field}]")
    box.clear()
    box.send_keys(value)
    driver.find_element("css selector", f"#{form_id} button").click()
    deadline = time.time() + 10
    while f"{field}={value}" not in driver.current_url and time.time() < deadline:
        time.sleep(0.1)


def _screenshot(driver, folder: Path, name: str) -> None:
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"


def test_static_index_sorts_and_filters(browser, site, shots):
    _load(browser, (site / "index.html").as_uri())
    assert console_errors(browser) == []
    rows = browser.find_elements("css selector", "#neurons tbody tr")
    assert len(rows) == 7
    headers = {h.text.strip(): h for h in browser.find_elements("css selector", "#neurons thead th")}
    col = list(headers).index("max") + 1
    headers["max"].click()
    values = _column(browser, "neurons", col)
    assert values == sorted(values, reverse=True)  # numbers sort descending first
    headers["max"].click()
    assert _column(browser, "neurons", col) == sorted(values)
    box = browser.find_element("id", "neuron-filter")
    box.send_keys("layer=1")
    layers = _column(browser, "neurons", list(headers).index("layer") + 1)
    assert layers and set(layers) == {1.0}
    assert browser.find_element("id", "neuron-count").text == str(len(layers))
    box.clear()
    box.send_keys("max>-1e9")
    assert len(_column(browser, "neurons", col)) == 7
    _screenshot(browser, shots, "index.png")
    assert console_errors(browser) == []


def test_static_neuron_page_shows_the_expected_examples(browser, site, viewer_store, shots):
    from selenium.webdriver.common.action_chains import ActionChains

    _load(browser, (site / "neurons" / "mlp.hook_post-1-7.html").as_uri())
    assert console_errors(browser) == []
    _no_dialog(browser)
    expected = run_sql(connect(viewer_store), "SELECT c.rank, c.value, t.token, t.doc_id FROM top_contexts c JOIN "
                       "tokens t USING (tok) WHERE c.hook = 'mlp.hook_post' AND c.layer = 1 AND c.neuron = 7 "
                       "AND c.rank <= 4 ORDER BY c.rank").to_pylist()
    shown = browser.find_elements("css selector", "#set-top .ex")
    assert len(shown) == 4
    for ex, want in zip(shown, expected):
        assert ex.get_attribute("data-rank") == str(want["rank"])
        meta = ex.find_element("css selector", ".meta").text
        assert f"value {want['value']:.4g}" in meta and f"doc {want['doc_id']} " in meta
        peak = ex.find_element("css selector", ".t.pk")
        assert float(peak.get_attribute("data-v")) == pytest.approx(want["value"], rel=1e-3, abs=1e-3)
        assert peak.get_attribute("textContent") == want["token"].replace("\n", "\u21b5\n")
    # the value on hover
    peak = shown[0].find_element("css selector", ".t.pk")
    ActionChains(browser).move_to_element(peak).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed() and f"{expected[0]['value']:.4g}" in tip.text
    for section in ("set-bottom", "set-band", "set-random", "quantiles", "logit-lens", "dla-positive"):
        assert browser.find_elements("id", section), section
    assert browser.find_elements("css selector", "svg.hist rect")
    # hostile corpus text is text: no dialog, no injected element, the characters visible
    body = browser.find_element("tag name", "body").text
    assert '<script>alert("x")</script>' in body and '"><img src=x onerror=alert(1)>' in body
    assert "<U+202E>" in body
    assert browser.find_elements("tag name", "img") == []
    assert len(browser.find_elements("tag name", "script")) == 1
    _no_dialog(browser)
    _screenshot(browser, shots, "neuron.png")
    assert console_errors(browser) == []


def test_static_head_page_paints_its_pattern(browser, site, shots):
    pages = sorted((site / "heads").glob("*.html"))
    assert len(pages) == 3
    _load(browser, pages[0].as_uri())
    assert console_errors(browser) == []
    canvases = browser.find_elements("css selector", "figure.attn canvas")
    assert len(canvases) == 3 and all(int(c.get_attribute("width")) > 0 for c in canvases)
    focused = browser.find_elements("css selector", "figure.attn .q.sel")
    assert len(focused) == 3  # the last query token of each pattern is selected at load
    weights = [float(t.get_attribute("data-v")) for t in
               browser.find_elements("css selector", "#attn-0 .q")]
    assert sum(weights) == pytest.approx(1.0, abs=0.01)  # a softmax row
    _screenshot(browser, shots, "head.png")


@pytest.fixture(scope="module")
def served(viewer_store):
    from mining.viewer.server import Viewer, make_server

    server = make_server(Viewer(viewer_store), 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_served_viewer(browser, served, viewer_store, shots):
    _load(browser, served + "/?by=max&limit=5")
    assert console_errors(browser) == []
    assert len(browser.find_elements("css selector", "#neurons tbody tr")) == 5
    best = run_sql(connect(viewer_store), "SELECT layer, neuron FROM neurons ORDER BY max DESC, layer, neuron "
                                          "LIMIT 1").to_pylist()[0]
    link = browser.find_element("css selector", "#neurons tbody tr td:nth-child(3) a")
    assert link.text == str(best["neuron"])
    link.click()
    assert browser.current_url.endswith(f"/neuron/mlp.hook_post/{best['layer']}/{best['neuron']}")
    assert len(browser.find_elements("css selector", "#set-top .ex")) == 8  # the store kept top_k 8
    assert console_errors(browser) == []
    _no_dialog(browser)
    _screenshot(browser, shots, "served-neuron.png")
    _load(browser, served + "/head/1/0")
    assert len(browser.find_elements("css selector", "figure.attn canvas")) == 3
    assert console_errors(browser) == []
    # the ranking form round-trips
    _load(browser, served + "/")
    _submit(browser, "rank", "limit", "3")
    assert len(browser.find_elements("css selector", "#neurons tbody tr")) == 3


def test_served_errors_are_pages_not_tracebacks(served):
    import urllib.error
    import urllib.request

    for path, status, text in (("/neuron/mlp.hook_post/0/99999", 400, "is not in the store"),
                               ("/nothing/here", 404, "no such page"), ("/?by=%3Cscript%3E", 400, "by must be"),
                               ("/head/9/9", 400, "not in this store")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(served + path)
        assert e.value.code == status
        body = e.value.read().decode()
        assert text in body and "Traceback" not in body and "<script>alert" not in body
    rebound = urllib.request.Request(served + "/", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as e:  # a DNS-rebinding page cannot read the viewer
        urllib.request.urlopen(rebound)
    assert e.value.code == 403


@pytest.fixture(scope="module")
def diff_site(hostile_job, tmp_path_factory):
    """The hostile corpus diffed between the viewer store's tiny model and its q4_0-rounded self, exported."""
    root = hostile_job.parent
    tmp = tmp_path_factory.mktemp("diff-site")
    job = tmp / "job.yaml"
    job.write_text(f"""
name: hostile-diff
models: {{a: {{id: "{root / 'model'}"}}, b: {{id: "{root / 'model'}", quantize: q4_0}}}}
corpus: {{source: "files:{root / 'docs'}/*.txt", context_length: 64, max_tokens: 1200}}
hooks: ["blocks.*.mlp.hook_post"]
stats: {{top_k: 4}}
compute: {{actors: 1, batch_size: 8}}
""")
    assert main(["run", str(job), "--store", str(tmp / "store"), "--no-progress"]) == 0
    assert main(["export", str(tmp / "store"), "--format", "html", "--top", "3", "--out", str(tmp / "site")]) == 0
    return tmp / "site"


def test_diff_viewer_pages(browser, diff_site, shots):
    """A diff store's index, a document and a neuron: no console errors, hostile text shown as text, a token's
    log-probs on hover."""
    from selenium.webdriver.common.action_chains import ActionChains

    _load(browser, (diff_site / "index.html").as_uri())
    assert console_errors(browser) == [] and browser.find_elements("css selector", "#docs tbody tr")
    body = browser.find_element("tag name", "body").text
    assert "B − A, log-prob of the actual next token" in body and "(quantize q4_0)" in body
    _screenshot(browser, shots, "diff-index.png")
    doc = sorted((diff_site / "docs").iterdir())[0]
    _load(browser, doc.as_uri())
    assert console_errors(browser) == []
    _no_dialog(browser)
    body = browser.find_element("id", "doc-text").text
    assert '<script>alert("x")</script>' in body and "<U+202E>" in body
    assert browser.find_elements("tag name", "img") == [] and len(browser.find_elements("tag name", "script")) == 1
    token = browser.find_elements("css selector", "#doc-text .t[data-v]")[5]
    ActionChains(browser).move_to_element(token).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed() and "B − A" in tip.text and "(A " in tip.text
    _screenshot(browser, shots, "diff-doc.png")
    neuron = sorted((diff_site / "neurons").iterdir())[0]
    _load(browser, neuron.as_uri())
    assert console_errors(browser) == [] and browser.find_elements("css selector", "#set-top_a tbody tr")
    _no_dialog(browser)


def test_document_pages(browser, site, served, shots):
    """An example's 'doc' link: statically, its document coloured by surprise at the peak token; served, coloured by
    the neuron. No console errors, hostile text as text, the numbers on hover."""
    from selenium.webdriver.common.action_chains import ActionChains

    _load(browser, (site / "neurons" / "mlp.hook_post-1-7.html").as_uri())
    link = browser.find_element("css selector", "#set-top .ex a.in-doc")
    anchor = link.get_attribute("href").split("#")[1]
    link.click()
    assert browser.current_url.endswith("#" + anchor) and "/docs/" in browser.current_url
    assert console_errors(browser) == []
    _no_dialog(browser)
    body = browser.find_element("id", "doc").text
    assert '<script>alert("x")</script>' in body and "<U+202E>" in body
    # the text between WordPiece spans keeps its newlines
    assert browser.find_element("id", "doc").value_of_css_property("white-space") == "pre-wrap"
    assert browser.find_elements("tag name", "img") == [] and len(browser.find_elements("tag name", "script")) == 1
    ActionChains(browser).move_to_element(browser.find_element("id", anchor)).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed() and "−log p" in tip.text and "entropy" in tip.text
    _screenshot(browser, shots, "document.png")
    _load(browser, served + "/neuron/mlp.hook_post/1/7")
    browser.find_element("css selector", "#set-top .ex a.in-doc").click()
    assert "/doc/" in browser.current_url and "neuron=7" in browser.current_url
    assert console_errors(browser) == []
    peak = browser.find_element("css selector", "#doc .t.pk")
    ActionChains(browser).move_to_element(peak).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed() and "activation" in tip.text
    _screenshot(browser, shots, "document-neuron.png")
    # the form colours by another neuron
    _submit(browser, "colour-by", "neuron", "3")
    assert "layer 1 neuron 3" in browser.find_element("id", "colouring").text
    assert console_errors(browser) == []
