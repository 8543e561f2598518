"""A document's page in the single-model viewer: its tokens coloured by how surprised the model was by each
(-log p, from the token table: no model needed), or by one neuron's activation over a window of its contexts
(replayed: `mine serve`, where the page is built on demand).

A neuron page's examples link here at their peak token, so a top context can be read in its whole document.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlencode

import duckdb
import numpy as np

from ..errors import UserError
from ..examples import NeuronId
from ..export import check_exist, default_hook
from ..query import has_tables, run_named
from ..replay import Context, Replayer, load_contexts
from .html import colour, esc, fmt, page, table, token_html

DOC_TOKENS = 20_000  # tokens of one document a served page shows coloured by surprise (about 2.6 MB of HTML)
WINDOW_CONTEXTS = 8  # contexts replayed for a neuron's colours: the anchor's, 3 before it and 4 after it
INDEX_DOCS = 100  # documents on the index (hardest first)
STATIC_DOC_PAGES = 200  # the static site: pages for the index's documents, then those examples come from, to this many
STATIC_DOC_TOKENS = 4096  # and each shows the document's first this many tokens: at most about 100 MB in all


DocLink = Callable[[int, "int | None", "NeuronId | None"], "str | None"]
"""(doc_id, anchor tok, neuron) -> the document page's address, or None where the site has no page for it."""


def static_doc_link(depth: int, docs: set[int], first_shown: dict[int, int]) -> DocLink:
    """Static pages are coloured by surprise only, and show a document's first STATIC_DOC_TOKENS tokens: a token
    past them (or in a document without a page) gets no link."""
    up = "../" * depth

    def link(doc_id: int, tok: int | None = None, nid: NeuronId | None = None) -> str | None:
        if doc_id not in docs or (tok is not None and tok >= first_shown.get(doc_id, 0) + STATIC_DOC_TOKENS):
            return None
        return f"{up}docs/{doc_id}.html" + ("" if tok is None else f"#t{tok}")

    return link


def served_doc_link(doc_id: int, tok: int | None = None, nid: NeuronId | None = None) -> str:
    query = {} if nid is None else {"hook": nid.hook, "layer": nid.layer, "neuron": nid.neuron}
    if tok is not None and nid is not None:
        query["tok"] = tok
    return f"/doc/{doc_id}" + (f"?{urlencode(query, quote_via=quote)}" if query else "") + (
        "" if tok is None else f"#t{tok}")


def window_link(doc_id: int, nid: NeuronId) -> Callable[[int], str]:
    """mine serve: the window of the document that starts at a token, coloured by the neuron."""
    return lambda tok: served_doc_link(doc_id, None, nid) + f"&start={tok}"


# ---------------------------------------------------------------- data


@dataclass
class Document:
    doc_id: int
    path: str | None
    total: int  # the document's mined tokens
    rows: list[dict]  # `document` query rows shown, in token order
    nid: NeuronId | None = None
    activations: dict[int, float] | None = None  # tok -> the neuron's activation, over the replayed window
    anchor: int | None = None  # the token the page was opened at
    earlier: int | None = None  # the first token of the window before this one (neuron pages); None at the start
    later: int | None = None  # the first token of the window after it; None at the end


def document_rows(con: duckdb.DuckDBPyConnection, doc_id: int, first: int = 0, last: int = -1) -> list[dict]:
    return run_named(con, "document", {"doc": str(doc_id), "first": str(first), "last": str(last)}).to_pylist()


def _doc(con: duckdb.DuckDBPyConnection, doc_id: int) -> tuple[str | None, int]:
    if not has_documents(con):
        raise UserError("this store has no document pages: its token table has no logprob, entropy or character "
                        "spans, or it has no docs table")
    found = con.execute("SELECT path FROM docs WHERE doc_id = ?", [doc_id]).fetchall()
    total = con.execute("SELECT count(*) FROM tokens WHERE doc_id = ?", [doc_id]).fetchall()[0][0]
    if not found or not total:
        raise UserError(f"document {doc_id} is not in this store (see `mine query STORE --named documents`)")
    return found[0][0], total


def surprise_document(con: duckdb.DuckDBPyConnection, doc_id: int, limit: int = DOC_TOKENS) -> Document:
    """The document's first `limit` tokens."""
    path, total = _doc(con, doc_id)
    first = con.execute("SELECT min(tok) FROM tokens WHERE doc_id = ?", [doc_id]).fetchall()[0][0]
    return Document(doc_id, path, total, document_rows(con, doc_id, first, first + limit - 1))


@dataclass
class Window:
    """WINDOW_CONTEXTS consecutive contexts of a document, to replay."""

    contexts: dict[int, Context]
    first: int  # its first and last token (tok)
    last: int
    earlier: int | None  # the first token of the window before it; None at the document's start
    later: int | None  # the first token of the window after it; None at its end


def doc_window(root: Path, con: duckdb.DuckDBPyConnection, doc_id: int, anchor: int | None = None,
               start: int | None = None) -> Window:
    """The contexts around the anchor token's (its context fourth, a full window where the document has one), or
    from the context of token `start` on (the windows 'earlier' and 'later' reach tile the document), or the
    document's first ones."""
    found = con.execute("SELECT ctx, min(tok) FROM tokens WHERE doc_id = ? GROUP BY ctx ORDER BY ctx",
                        [doc_id]).fetchall()
    if not found:
        raise UserError(f"document {doc_id} is not in this store (see `mine query STORE --named documents`)")
    ctxs, firsts = [r[0] for r in found], [r[1] for r in found]

    def ctx_index(tok: int) -> int:
        at = con.execute("SELECT ctx FROM tokens WHERE tok = ? AND doc_id = ?", [tok, doc_id]).fetchall()
        if not at:
            raise UserError(f"token {tok} is not in document {doc_id}")
        return ctxs.index(at[0][0])

    if start is not None:
        lo = ctx_index(start)
    else:
        lo = max(0, min(ctx_index(anchor) - 3 if anchor is not None else 0, len(ctxs) - WINDOW_CONTEXTS))
    chosen = ctxs[lo : lo + WINDOW_CONTEXTS]
    contexts = load_contexts(root, chosen)
    return Window(contexts, min(contexts[chosen[0]].tok), max(contexts[chosen[-1]].tok),
                  firsts[max(0, lo - WINDOW_CONTEXTS)] if lo > 0 else None,
                  firsts[lo + WINDOW_CONTEXTS] if lo + WINDOW_CONTEXTS < len(ctxs) else None)


def window_activations(replayer: Replayer, nid: NeuronId, window: Window) -> dict[int, float]:
    """tok -> the neuron's activation, at every token of the window (replayed)."""
    acts = replayer.activations(nid.hook, [nid.layer], window.contexts, {nid.layer: [nid.neuron]})
    return {t: float(v) for c in window.contexts.values() for t, v in zip(c.tok, acts[(nid.layer, c.ctx)][:, 0])}


def neuron_document(root: Path, con: duckdb.DuckDBPyConnection, replayer: Replayer, doc_id: int, nid: NeuronId,
                    anchor: int | None = None, start: int | None = None) -> Document:
    """A window of the document (doc_window), coloured by the neuron's activation at every token."""
    path, total = _doc(con, doc_id)
    check_exist(con, [nid])
    w = doc_window(root, con, doc_id, anchor, start)
    rows = document_rows(con, doc_id, w.first, w.last)
    return Document(doc_id, path, total, rows, nid, window_activations(replayer, nid, w), anchor, w.earlier, w.later)


def has_documents(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether document pages can be built: a token table with its log-prob columns (every mined store has them;
    a store assembled by hand may not) and the documents' text."""
    if not has_tables(con, "tokens", "docs"):
        return False
    columns = {r[0] for r in con.execute("DESCRIBE tokens").fetchall()}
    return {"logprob", "entropy", "char_start", "char_end"} <= columns


def index_documents(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """The index's documents: the INDEX_DOCS with the highest mean loss."""
    if not has_documents(con):
        return []
    return run_named(con, "documents", {"order": "loss", "limit": str(INDEX_DOCS)}).to_pylist()


# ---------------------------------------------------------------- pages


def documents_section(rows: list[dict], link: DocLink) -> str:
    if not rows:
        return ""
    if any(r["mean_loss"] is not None for r in rows):
        head = ("<h2>Documents, hardest for the model first</h2>"
                "<p class=note>mean loss: the mean of −log p over the document's predicted tokens, in nats; "
                "a document's page colours every token by it</p>")
    else:
        head = ("<h2>Documents</h2><p class=note>this store has no log-probs (an encoder model predicts no next "
                "token): a document's page shows its text, and `mine serve` colours it by any neuron</p>")
    return (head
            + table([("doc_id", "num"), ("path", "txt"), ("tokens", "num"), ("mean_loss", "num"),
                     ("max_surprise", "num")],
                    ([r["doc_id"], r["path"], r["tokens"], r["mean_loss"], r["max_surprise"]] for r in rows),
                    table_id="documents", links={0: [link(r["doc_id"], None, None) for r in rows]}))


def document_page(title: dict[str, Any], d: Document, index: str, neuron_link: str | None = None,
                  window_link: Callable[[int], str] | None = None, controls: str = "") -> str:
    """Colours: surprise (orange, 0 to its 98th percentile on the page) or, with a neuron, its activation (orange
    positive, blue negative, to the window's largest |value|). Each token's tooltip gives all its numbers."""
    surprises = [r["surprise"] for r in d.rows if r["surprise"] is not None]
    by_neuron = d.activations is not None
    if by_neuron:
        scale = max((abs(v) for v in d.activations.values()), default=0.0) or 1.0
    else:
        scale = max(1.0, float(np.quantile(surprises, 0.98))) if surprises else 1.0
    spans = []
    for r in d.rows:
        tip = []
        value = None
        if by_neuron:
            value = d.activations.get(r["tok"])
            if value is not None:
                tip.append(f"activation {fmt(value)}")
        if r["surprise"] is not None:
            tip.append(f"−log p {r['surprise']:.3f} · entropy {fmt(r['entropy'])}")
            if not by_neuron:
                value = r["surprise"]
        cls = "t pk" if r["tok"] == d.anchor else "t"
        style = f' style="background:{colour(value, scale)}"' if value is not None else ""
        data = f' data-v="{esc(" · ".join(tip))}"' if tip else ""
        gap = token_html(r["gap"]) if r["gap"] else ""
        spans.append(f'{gap}<span class="{cls}" id="t{r["tok"]}"{style}{data}>{token_html(r["token"])}</span>')
    first, last = (d.rows[0]["tok"], d.rows[-1]["tok"]) if d.rows else (0, -1)
    span = (f"all {d.total:,} of its mined tokens" if len(d.rows) == d.total
            else f"tokens {first:,}–{last:,} ({len(d.rows):,} of its {d.total:,} mined tokens)")
    loss = f"; mean −log p over them {fmt(float(np.mean(surprises)))} nats" if surprises else ""
    if by_neuron:
        n = d.nid
        what = (f"coloured by {esc(n.hook)} layer {n.layer} neuron {n.neuron} (replayed; largest |activation| "
                f"here {fmt(scale)}). Hover a token for its activation"
                f"{', −log p and entropy' if surprises else ''}.")
    elif surprises:
        what = ("coloured by the model's surprise at each token (−log p, orange up to "
                f"{fmt(scale)} nats). Hover a token for its −log p and the entropy of that prediction.")
    else:
        what = "not coloured: this store has no log-probs (an encoder model predicts no next token)."
    body = [f"<h1>Document {d.doc_id}: {esc(d.path)}</h1>",
            f"<p class=note>model {esc(title['model'])} · {span}{loss}</p>", f"<p class=note id=colouring>{what}</p>",
            controls]
    body += [window_moves(window_link, d.earlier, d.later), f'<div class="toks doc" id="doc">{"".join(spans)}</div>']
    nav = [("index", index)] + ([("neuron", neuron_link)] if neuron_link else [])
    return page(f"document {d.doc_id}", "\n".join(body), nav=nav)


def window_moves(window_link: Callable[[int], str] | None, earlier: int | None, later: int | None) -> str:
    """Links to the windows before and after this one (served neuron pages)."""
    moves = [f'<a id={name} href="{esc(window_link(tok))}">{name} tokens</a>'
             for name, tok in (("earlier", earlier), ("later", later)) if window_link and tok is not None]
    return "<p>" + " · ".join(moves) + "</p>" if moves else ""


def neuron_form(doc_id: int, hooks: list[str], nid: NeuronId | None, plain: str = "by surprise") -> str:
    """mine serve: colour the document by any neuron of the store (`plain`: the link back to its own colouring)."""
    hook = nid.hook if nid else default_hook(hooks)
    opts = "".join(f'<option{" selected" if h == hook else ""}>{esc(h)}</option>' for h in hooks)
    layer = "" if nid is None else nid.layer
    neuron = "" if nid is None else nid.neuron
    return (f'<form method="get" action="/doc/{doc_id}" id="colour-by">colour by a neuron: '
            f'<label>hook <select name="hook">{opts}</select></label> '
            f'<label>layer <input name="layer" value="{layer}" size="4"></label> '
            f'<label>neuron <input name="neuron" value="{neuron}" size="6"></label> '
            f'<button type="submit">colour</button> <a href="/doc/{doc_id}">{esc(plain)}</a></form>')
