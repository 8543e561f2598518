"""Document pages of the single-model viewer: the static ones coloured by the model's surprise (checked against the
token table) and, in `mine serve`, a window of contexts coloured by one neuron (checked against the mined values)."""

import html
import re

import pytest

from mining.cli import main
from mining.query import connect, run_sql

pytestmark = [pytest.mark.ray]


def _export(store, out, *args) -> int:
    return main(["export", str(store), "--out", str(out), *args])


def _doc_spans(text: str) -> dict[int, str | None]:
    """tok -> the tooltip of each token span of a document page (None where it has none)."""
    return {int(t): (html.unescape(v) if v else None)
            for t, v in re.findall(r'<span class="t(?: pk)?" id="t(\d+)"(?: style="[^"]*")?(?: data-v="([^"]*)")?>',
                                   text)}


def test_static_document_pages_show_each_tokens_surprise(viewer_store, tmp_path):
    """docs/*.html: one per document on the index and per document an example comes from; every token of the
    document once, its tooltip -log p equal to the token table's log-prob on the row before it (that row predicted
    it), and each example's 'doc' link lands on its peak token."""
    out = tmp_path / "site"
    assert _export(viewer_store, out, "--top", "3", "--format", "html", "--heads", "0", "--k", "3") == 0
    con = connect(viewer_store)
    toks = run_sql(con, "SELECT tok, doc_id, logprob FROM tokens ORDER BY tok").to_pylist()
    by_doc: dict[int, list[dict]] = {}
    for r in toks:
        by_doc.setdefault(r["doc_id"], []).append(r)
    pages = {int(p.stem): p.read_text(encoding="utf-8") for p in (out / "docs").glob("*.html")}
    assert set(pages) == set(by_doc)  # six documents: all on the index
    for doc_id, rows in by_doc.items():
        spans = _doc_spans(pages[doc_id])
        assert sorted(spans) == [r["tok"] for r in rows]
        for prev, r in zip(rows, rows[1:]):
            tip = spans[r["tok"]]
            want = -prev["logprob"]
            got = float(re.match(r"−log p ([\d.]+) · entropy", tip).group(1))
            assert got == pytest.approx(want, abs=6e-4)
        assert spans[rows[0]["tok"]] is None  # nothing predicted a document's first token
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="documents"' in index and all(f'href="docs/{d}.html"' in index for d in by_doc)
    mean = {r["doc_id"]: r["mean_loss"] for r in run_sql(con, "SELECT doc_id, -avg(logprob) FILTER "
                                                              "(WHERE NOT isnan(logprob)) AS mean_loss FROM tokens "
                                                              "GROUP BY 1").to_pylist()}
    listed = [int(d) for d in re.findall(r'<a href="docs/(\d+).html">', index)]
    assert listed == sorted(mean, key=lambda d: (-mean[d], d))  # hardest first
    linked = 0
    for page in (out / "neurons").glob("*.html"):
        for doc_id, tok in re.findall(r'class="in-doc" href="../docs/(\d+).html#t(\d+)"', page.read_text("utf-8")):
            assert f'id="t{tok}"' in pages[int(doc_id)]
            linked += 1
    assert linked >= 3 * 3  # every top example of the three neurons, at least


@pytest.fixture(scope="module")
def viewer(viewer_store):
    from mining.viewer.server import Viewer

    return Viewer(viewer_store)


def _get(viewer, url: str) -> str:
    status, text = viewer.handle(url)
    assert status == 200, re.findall(r"<p id=error>(.*?)</p>", text)
    return text


def test_served_document_coloured_by_a_neuron_agrees_with_the_mined_values(viewer, viewer_store):
    """A top example's link opens its document around its peak token, coloured by the neuron: the replayed value at
    the peak is the mined one, and every token of the window's contexts has its activation."""
    con = connect(viewer_store)
    tops = run_sql(con, "SELECT e.layer, e.neuron, e.value, e.tok, t.doc_id, t.ctx FROM top_examples AS e "
                        "JOIN tokens AS t USING (tok) WHERE e.hook = 'mlp.hook_post' AND e.rank = 1 "
                        "ORDER BY e.value DESC LIMIT 3").to_pylist()
    for top in tops:
        neuron_page = _get(viewer, f"/neuron/mlp.hook_post/{top['layer']}/{top['neuron']}")
        want = (f"/doc/{top['doc_id']}?hook=mlp.hook_post&amp;layer={top['layer']}&amp;neuron={top['neuron']}"
                f"&amp;tok={top['tok']}#t{top['tok']}")
        assert f'class="in-doc" href="{want}"' in neuron_page
        page = _get(viewer, html.unescape(want).split("#")[0])
        spans = _doc_spans(page)
        peak = re.search(rf'<span class="t pk" id="t{top["tok"]}"', page)
        assert peak and len(re.findall(r'class="t pk"', page)) == 1
        assert float(re.match(r"activation ([-\d.e]+)", spans[top["tok"]]).group(1)) == pytest.approx(
            top["value"], rel=5e-4, abs=2e-4)  # shown to 4 significant digits
        ctxs = run_sql(con, f"SELECT DISTINCT ctx FROM tokens WHERE doc_id = {top['doc_id']} ORDER BY ctx").to_pylist()
        ctxs = [r["ctx"] for r in ctxs]
        window = run_sql(con, f"SELECT tok, ctx FROM tokens WHERE doc_id = {top['doc_id']} ORDER BY tok").to_pylist()
        shown = {r["ctx"] for r in window if r["tok"] in spans}
        assert top["ctx"] in shown and len(shown) == min(len(ctxs), 8)
        assert all(spans[r["tok"]].startswith("activation ") for r in window if r["ctx"] in shown)
        assert f"layer {top['layer']} neuron {top['neuron']}" in page


def test_served_document_windows_cover_the_document_once(viewer, viewer_store, monkeypatch):
    """With windows of 3 contexts, 'later' links walk the document: every token exactly once; 'earlier' walks back."""
    from mining.viewer import document

    monkeypatch.setattr(document, "WINDOW_CONTEXTS", 3)
    con = connect(viewer_store)
    doc_toks = [r["tok"] for r in run_sql(con, "SELECT tok FROM tokens WHERE doc_id = 2 ORDER BY tok").to_pylist()]
    url, seen, pages = "/doc/2?hook=mlp.hook_post&layer=1&neuron=7", [], []
    while url:
        page = _get(viewer, url)
        pages.append(page)
        seen += sorted(_doc_spans(page))
        later = re.search(r'id=later href="([^"]+)"', page)
        url = html.unescape(later.group(1)) if later else None
    assert seen == doc_toks and len(pages) == 3  # 7 contexts: 3 + 3 + 1
    assert "id=earlier" not in pages[0]
    back = html.unescape(re.search(r'id=earlier href="([^"]+)"', pages[1]).group(1))
    assert _doc_spans(_get(viewer, back)) == _doc_spans(pages[0])


def test_served_document_pages_and_refusals(viewer):
    index = _get(viewer, "/")
    assert 'id="documents"' in index and 'href="/doc/0"' in index
    page = _get(viewer, "/doc/0")
    assert 'id="colour-by"' in page and "coloured by the model's surprise" in page
    for url, says in (("/doc/99", "document 99 is not in this store"),
                      ("/doc/0?layer=1&neuron=99999", "neuron 1:99999 of mlp.hook_post is not in the store"),
                      ("/doc/0?layer=1", "neuron must be an integer"),
                      ("/doc/0?layer=1&neuron=2&tok=999999", "token 999999 is not in document 0"),
                      ("/doc/0?hook=attn.hook_z&layer=1&neuron=2", "of attn.hook_z is not in the store")):
        status, text = viewer.handle(url)
        assert status == 400 and says in html.unescape(text), (url, text[-300:])


def test_static_document_pages_are_bounded(viewer_store, tmp_path, monkeypatch):
    """At most STATIC_DOC_PAGES pages (the hardest documents first), each the first STATIC_DOC_TOKENS tokens; a link
    only where its page and token exist."""
    from mining.viewer import document

    monkeypatch.setattr(document, "STATIC_DOC_PAGES", 3)
    monkeypatch.setattr(document, "STATIC_DOC_TOKENS", 100)
    out = tmp_path / "site"
    assert _export(viewer_store, out, "--top", "3", "--format", "html", "--heads", "0", "--k", "3") == 0
    con = connect(viewer_store)
    hardest = [r["doc_id"] for r in run_sql(con, "SELECT doc_id FROM tokens GROUP BY doc_id ORDER BY "
                                                 "avg(logprob) FILTER (WHERE NOT isnan(logprob)), doc_id "
                                                 "LIMIT 3").to_pylist()]
    pages = {int(p.stem): p.read_text(encoding="utf-8") for p in (out / "docs").glob("*.html")}
    assert sorted(pages) == sorted(hardest)
    first = dict(con.execute("SELECT doc_id, min(tok) FROM tokens GROUP BY 1").fetchall())
    for d, text in pages.items():
        assert sorted(_doc_spans(text)) == list(range(first[d], first[d] + 100))
        assert "of its 439 mined tokens" in text
    links = 0
    for page in [*(out / "neurons").glob("*.html"), out / "index.html"]:
        text = page.read_text("utf-8")
        for d, tok in re.findall(r'href="(?:\.\./)?docs/(\d+).html(?:#t(\d+))?"', text):
            assert int(d) in pages and (not tok or f'id="t{tok}"' in pages[int(d)])
            links += 1
    assert links >= 3
    index = (out / "index.html").read_text("utf-8")
    assert index.count('href="docs/') == 3 and 'id="documents"' in index


def test_a_store_without_log_probs_says_so():
    """An encoder (BERT) predicts no next token: no colours, and the pages say why."""
    from mining.viewer.document import Document, document_page, documents_section

    rows = [{"doc_id": 0, "path": "a.txt", "tokens": 3, "mean_loss": None, "max_surprise": None}]
    section = documents_section(rows, lambda d, tok=None, nid=None: f"docs/{d}.html")
    assert "no log-probs" in section and "hardest" not in section and 'href="docs/0.html"' in section
    toks = [{"tok": i, "token": t, "surprise": None, "logprob": None, "entropy": None, "gap": ""}
            for i, t in enumerate(["a", " b", " c"])]
    page = document_page({"model": "minilm-l6"}, Document(0, "a.txt", 3, toks), "../index.html")
    shown = page.split('id="doc"')[1].split("</div>")[0]
    assert "not coloured: this store has no log-probs" in page and "style=" not in shown


def test_a_store_whose_token_table_has_no_scores_opens_without_document_pages(tmp_path):
    """A store assembled by hand may lack logprob/entropy: it still opens (the macro reading them is skipped), the
    index has no documents, and a document page is refused in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mining.errors import UserError
    from mining.viewer.document import index_documents, surprise_document

    store = tmp_path / "store"
    (store / "tokens").mkdir(parents=True)
    pq.write_table(pa.table({"tok": [0, 1], "ctx": [0, 0], "pos": [1, 2], "doc_id": [0, 0], "char_start": [0, 1],
                             "char_end": [1, 2], "token": ["a", "b"]}), store / "tokens" / "shard-00000.parquet")
    pq.write_table(pa.table({"doc_id": [0], "text": ["ab"]}), store / "docs.parquet")
    pq.write_table(pa.table({"shard": [0], "status": ["complete"]}), store / "manifest.parquet")
    con = connect(store)
    assert index_documents(con) == []
    with pytest.raises(UserError, match="no document pages"):
        surprise_document(con, 0)
