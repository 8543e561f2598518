"""The static viewer: index.html, neurons/*.html, heads/*.html, docs/*.html; opens from the file system, offline.

Document pages (coloured by the model's surprise) are written for the index's documents and the documents examples
come from (bounded: document.STATIC_DOC_PAGES, STATIC_DOC_TOKENS); colouring a document by a neuron needs a replay of
it, so only `mine serve` does that."""

from __future__ import annotations

from pathlib import Path

import duckdb

from ..examples import Example, NeuronId
from ..replay import Context, Replayer, load_contexts
from . import data, document
from .document import document_page, index_documents, static_doc_link, surprise_document
from .pages import head_page, index_page, neuron_page, static_links

PATTERN_TOKENS = 48  # tokens of each example context shown in a head's attention pattern
PATTERN_CONTEXTS = 2
REPEAT_TOKENS = 20  # the repeated-text example: induction and duplicate-token heads stand out


def write_site(root: Path, con: duckdb.DuckDBPyConnection, by_neuron: dict[NeuronId, list[Example]], out: Path,
               replayer: Replayer, n_heads: int) -> int:
    """Build the site in a temporary directory and move it into place whole; returns the head pages written."""
    from ..export import publish_dir

    heads = data.top_heads(con, n_heads)
    neurons = set(by_neuron)
    listed = index_documents(con)
    wanted = [r["doc_id"] for r in listed] + [e.context.doc_id for exs in by_neuron.values() for e in exs if e.context]
    docs = set(list(dict.fromkeys(wanted))[:document.STATIC_DOC_PAGES]) if document.has_documents(con) else set()
    first_tok = dict(con.execute("SELECT doc_id, min(tok) FROM tokens GROUP BY doc_id").fetchall()) if docs else {}

    def doc_links(depth: int):
        return static_doc_link(depth, docs, first_tok)

    def build(tmp: Path) -> None:
        title = data.store_title(con, root)
        rows = data.index_rows(con, list(by_neuron))
        (tmp / "index.html").write_text(index_page(title, rows, data.head_rows(con),
                                                   static_links(0, neurons, set(heads), doc_links), docs=listed),
                                        encoding="utf-8")
        (tmp / "neurons").mkdir()
        links = static_links(1, neurons, set(heads), doc_links)
        if docs:
            (tmp / "docs").mkdir()
        for doc_id in sorted(docs):
            html = document_page(title, surprise_document(con, doc_id, document.STATIC_DOC_TOKENS), links.index)
            (tmp / "docs" / f"{doc_id}.html").write_text(html, encoding="utf-8")
        n_ctx = data.context_length(root)  # names an attention pattern's features (job.yaml, read once)
        for nid, exs in by_neuron.items():
            html = neuron_page(data.neuron_page(con, nid, exs, n_ctx), links)
            (tmp / "neurons" / f"{nid.hook}-{nid.layer}-{nid.neuron}.html").write_text(html, encoding="utf-8")
        if heads:
            (tmp / "heads").mkdir()
            contexts = pattern_contexts(root, con)
            for layer, head in heads:
                html = head_page(layer, head, data.head_scores(con, layer, head),
                                 head_patterns(replayer, layer, head, contexts), links)
                (tmp / "heads" / f"{layer}-{head}.html").write_text(html, encoding="utf-8")

    publish_dir(out, build)
    return len(heads)


def pattern_contexts(root: Path, con: duckdb.DuckDBPyConnection) -> list[Context]:
    """The corpus' first contexts: the same example text on every head page, so heads compare."""
    ctxs = [r[0] for r in con.execute(f"SELECT DISTINCT ctx FROM tokens ORDER BY ctx LIMIT {PATTERN_CONTEXTS}").fetchall()]
    found = load_contexts(root, ctxs)
    return [found[c] for c in ctxs]


def head_patterns(replayer: Replayer, layer: int, head: int, contexts: list[Context]):
    """(title, context, pattern, token labels) for each example context, plus the first context's first
    tokens repeated twice: induction heads show as a stripe one token after the earlier copy."""
    out = []
    shown = list(contexts)
    if contexts:
        first, n = contexts[0], REPEAT_TOKENS
        shown.append(Context(-1 - first.ctx, first.tok[:n] * 2, tuple(range(2 * len(first.tok[:n]))),
                             first.token_id[:n] * 2, first.token[:n] * 2, first.doc_id,
                             first.char_start[:n] * 2, first.char_end[:n] * 2))
    for ctx in shown:
        pattern, n_prefix = replayer.attention(layer, ctx, PATTERN_TOKENS)
        start, end = ctx.span
        title = (f"context {ctx.ctx} (doc {ctx.doc_id} chars {start}–{end})" if ctx.ctx >= 0 else
                 f"the first {len(ctx.tok) // 2} tokens of context {-1 - ctx.ctx}, repeated")
        labels = ["⟨bos⟩"] * n_prefix + list(ctx.token[:PATTERN_TOKENS])
        out.append((title, pattern[head], labels))
    return out
