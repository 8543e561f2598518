"""The viewer of a diff store (two models over the same tokens): where B predicts better or worse, document by
document and token by token, and which neurons and weights changed. Read through the diff store's named queries;
the same pages for `mine export --format html` and `mine serve`, only the links differ (DiffLinks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

import duckdb
import numpy as np
import yaml

from ..errors import UserError
from ..examples import NeuronId
from ..query import has_tables, run_named
from . import document
from .document import DocLink, doc_window, served_doc_link, static_doc_link, window_activations, window_moves
from .html import colour, esc, fmt, page, table, token_html

DOC_TOKENS = 20_000  # tokens a served document page shows (a static one: document.STATIC_DOC_TOKENS)
DOC_PAGES = 100  # static export: pages for this many best and as many worst documents (by mean gain)
INDEX_DOCS = 1000
TOKEN_ROWS = 20
EXAMPLES = 10
DIFF_SETS = {"b_above_a": "Where B's activation most exceeds A's (value: B − A)",
             "a_above_b": "Where A's activation most exceeds B's (value: B − A)",
             "top_a": "A's top activations", "top_b": "B's top activations"}
NEURON_ORDERS = ("mean_abs_diff", "corr", "overlap")
TRACED = ("b_above_a", "a_above_b")  # sets whose first TRACES contexts are replayed through both models
TRACES = 5
TRACE_BEFORE, TRACE_AFTER = 24, 8  # tokens shown around the marked one


@dataclass(frozen=True)
class DiffLinks:
    index: str
    doc: DocLink  # (doc_id, tok to scroll to, neuron to colour by where the site can) -> href
    neuron: Callable[[NeuronId], str | None]


def static_links(depth: int, docs: set[int], neurons: set[NeuronId], first_tok: dict[int, int]) -> DiffLinks:
    """Static document pages are coloured by B − A log-prob only (a neuron's colours need a replay), and show a
    document's first document.STATIC_DOC_TOKENS tokens (first_tok: each document's first token)."""
    up = "../" * depth
    return DiffLinks(
        index=f"{up}index.html",
        doc=static_doc_link(depth, docs, first_tok),
        neuron=lambda n: f"{up}neurons/{n.hook}-{n.layer}-{n.neuron}.html" if n in neurons else None,
    )


SERVED = DiffLinks(index="/", doc=served_doc_link, neuron=lambda n: f"/neuron/{quote(n.hook)}/{n.layer}/{n.neuron}")


def is_diff_store(con: duckdb.DuckDBPyConnection) -> bool:
    return not has_tables(con, "neurons") and has_tables(con, "token_diff")


# ---------------------------------------------------------------- data


def models_title(root: Path, con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    spec = yaml.safe_load((root / "job.yaml").read_text())
    mean, tokens = con.execute("SELECT avg(diff), count(*) FROM token_diff").fetchall()[0]
    return {"name": spec.get("name", root.name), "a": _model_label(spec["models"]["a"]),
            "b": _model_label(spec["models"]["b"]), "corpus": (spec.get("corpus") or {}).get("source"),
            "tokens": tokens, "mean_gain": mean}


def _model_label(m: dict[str, Any]) -> str:
    extra = [f"{k} {m[k]}" for k in ("quantize", "dtype", "revision") if m.get(k) and m[k] != "float32"]
    return m["id"] + (f" ({', '.join(extra)})" if extra else "")


def doc_rows(con: duckdb.DuckDBPyConnection) -> list[dict]:
    return run_named(con, "doc-diff", {"limit": str(INDEX_DOCS)}).to_pylist()


def paged_docs(con: duckdb.DuckDBPyConnection) -> set[int]:
    """The static export's document pages: the DOC_PAGES best and DOC_PAGES worst by mean gain."""
    ids = run_named(con, "doc-diff", {"limit": str(2**62)}).column("doc_id").to_pylist()
    return set(ids[:DOC_PAGES]) | set(ids[-DOC_PAGES:])


def token_rows(con: duckdb.DuckDBPyConnection, direction: str) -> list[dict]:
    return run_named(con, "token-gains", {"direction": direction, "k": str(TOKEN_ROWS)}).to_pylist()


def pick_neurons(con: duckdb.DuckDBPyConnection, hook: str, explicit: Sequence[tuple[int, int]] = (), top: int = 0,
                 by: str = "mean_abs_diff", layer: int = -1) -> list[NeuronId]:
    """Explicit neurons, then the top N of neuron-diff by `by` (mean_abs_diff, corr: least correlated, overlap)."""
    if by not in NEURON_ORDERS:
        raise UserError(f"by {by!r}: a diff store ranks neurons by {', '.join(NEURON_ORDERS)}")
    chosen = [NeuronId(hook, la, n) for la, n in explicit]
    if top > 0 and has_tables(con, "neuron_diff"):
        chosen += [NeuronId(r["hook"], r["layer"], r["neuron"]) for r in run_named(
            con, "neuron-diff", {"hook": hook, "layer": str(layer), "order": by, "limit": str(top)}).to_pylist()]
    for n in chosen:
        found = has_tables(con, "neuron_diff") and con.execute(
            "SELECT count(*) FROM neuron_diff WHERE hook = ? AND layer = ? AND neuron = ?",
            [n.hook, n.layer, n.neuron]).fetchall()[0][0]
        if not found:
            raise UserError(f"neuron {n.layer}:{n.neuron} of {n.hook} is not in this diff store's neuron_diff "
                            "(see `mine query STORE --named neuron-diff`)")
    return list(dict.fromkeys(chosen))


def neuron_rows(con: duckdb.DuckDBPyConnection, nids: Sequence[NeuronId]) -> list[dict]:
    rows = []
    for n in nids:
        rows += _dicts(con, "SELECT hook, layer, neuron, mean_abs_diff, corr, top_overlap, mean_a, mean_b, std_a, "
                            "std_b FROM neuron_diff WHERE hook = ? AND layer = ? AND neuron = ?",
                       [n.hook, n.layer, n.neuron])
    return rows


def match_rows(con: duckdb.DuckDBPyConnection, order: str, limit: int = 20) -> list[dict]:
    if not has_tables(con, "neuron_match"):
        return []
    return run_named(con, "neuron-match", {"order": order, "limit": str(limit)}).to_pylist()


def weight_rows(con: duckdb.DuckDBPyConnection, what: str, limit: int = 20) -> list[dict]:
    if not has_tables(con, "weight_diff", "neuron_weight_diff", "head_weight_diff"):
        return []
    return run_named(con, "weight-changes", {"what": what, "limit": str(limit)}).to_pylist()


@dataclass
class DocPage:
    doc_id: int
    path: str | None
    tokens: list[dict]  # doc-tokens rows
    total: int
    nid: NeuronId | None = None
    acts: dict[int, tuple[float, float]] | None = None  # tok -> the neuron's activation under A and B (a window)
    anchor: int | None = None  # the token the page was opened at (marked)
    earlier: int | None = None  # the first token of the window before (see document.doc_window)
    later: int | None = None


def doc_page_data(con: duckdb.DuckDBPyConnection, doc_id: int, limit: int = DOC_TOKENS) -> DocPage:
    found = con.execute("SELECT path, n_tokens FROM docs WHERE doc_id = ?", [doc_id]).fetchall()
    if not found:
        raise UserError(f"document {doc_id} is not in this store (see `mine query STORE --named doc-diff`)")
    total = con.execute("SELECT count(*) FROM tokens WHERE doc_id = ?", [doc_id]).fetchall()[0][0]
    rows = run_named(con, "doc-tokens", {"doc": str(doc_id), "limit": str(limit)}).to_pylist() if limit else []
    return DocPage(doc_id, found[0][0], rows, total)


def neuron_doc_page_data(con: duckdb.DuckDBPyConnection, replay: "DiffReplay", doc_id: int, nid: NeuronId,
                         anchor: int | None = None, start: int | None = None) -> DocPage:
    """A window of the document's contexts (document.doc_window) replayed through both models for the neuron."""
    pick_neurons(con, nid.hook, [(nid.layer, nid.neuron)])  # refuses a neuron the store does not have
    whole = doc_page_data(con, doc_id, limit=0)
    w = doc_window(replay.root, con, doc_id, anchor, start)
    rows = run_named(con, "doc-tokens", {"doc": str(doc_id), "first": str(w.first), "last": str(w.last),
                                         "limit": str(DOC_TOKENS)}).to_pylist()
    a, b = (window_activations(replay.sides[side], nid, w) for side in ("a", "b"))
    return DocPage(doc_id, whole.path, rows, whole.total, nid, {t: (a[t], b[t]) for t in a}, anchor, w.earlier,
                   w.later)


def neuron_page_data(con: duckdb.DuckDBPyConnection, nid: NeuronId, replay: "DiffReplay | None" = None
                     ) -> dict[str, Any]:
    rows = neuron_rows(con, [nid])
    if not rows:
        raise UserError(f"neuron {nid.layer}:{nid.neuron} of {nid.hook} is not in this diff store's neuron_diff")
    p = {"hook": nid.hook, "layer": str(nid.layer), "neuron": str(nid.neuron), "k": str(EXAMPLES)}
    sets = {s: run_named(con, "neuron-diff-examples", {**p, "set": s}).to_pylist() for s in DIFF_SETS}
    extra: dict[str, Any] = {}
    if nid.hook == "mlp.hook_post" and has_tables(con, "neuron_weight_diff"):
        extra.update(_one(con, "SELECT in_norm, out_norm, in_rel, out_rel FROM neuron_weight_diff "
                               "WHERE layer = ? AND neuron = ?", [nid.layer, nid.neuron]))
    if has_tables(con, "dla_diff"):  # neurons, and SAE latents that write the stream
        extra.update(_one(con, "SELECT mean_dla_a, mean_dla_b, diff AS dla_diff FROM dla_diff "
                               "WHERE hook = ? AND layer = ? AND neuron = ?", [nid.hook, nid.layer, nid.neuron]))
    traces = {s: replay.traces(con, nid, sets[s][:TRACES]) for s in TRACED} if replay else {}
    return {"stats": rows[0], "extra": extra, "sets": sets, "traces": traces}


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> dict[str, Any]:
    rows = _dicts(con, sql, params)
    return rows[0] if rows else {}


def _dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


class DiffReplay:
    """Both models of a diff store, replaying contexts (each a Replayer of its own: loaded on first use)."""

    def __init__(self, root: Path):
        from ..replay import Replayer

        job = yaml.safe_load((Path(root) / "job.yaml").read_text())
        self.root = Path(root)
        self.sides = {}
        for side in ("a", "b"):
            one = {k: v for k, v in job.items() if k != "models"} | {"model": job["models"][side]}
            self.sides[side] = Replayer(self.root, job=one)

    def traces(self, con: duckdb.DuckDBPyConnection, nid: NeuronId, rows: list[dict]) -> list[dict]:
        """Each example row's whole context, with the neuron's activation at every token under A and under B."""
        from ..replay import load_contexts

        if not rows:
            return []
        toks = [r["tok"] for r in rows]
        ctx_of = dict(con.execute("SELECT tok, ctx FROM tokens WHERE tok IN (SELECT unnest(?))", [toks]).fetchall())
        contexts = load_contexts(self.root, set(ctx_of.values()))
        acts = {side: rep.activations(nid.hook, [nid.layer], contexts, {nid.layer: [nid.neuron]})
                for side, rep in self.sides.items()}
        out = []
        for r in rows:
            c = contexts[ctx_of[r["tok"]]]
            out.append({**r, "context_tokens": c.token, "peak": c.tok.index(r["tok"]), "doc_span": c.span,
                        **{side: acts[side][(nid.layer, c.ctx)][:, 0].tolist() for side in self.sides}})
        return out


# ---------------------------------------------------------------- pages


def index_page(title: dict[str, Any], docs: list[dict], gains: list[dict], losses: list[dict],
               neurons: list[dict], weights: dict[str, list[dict]], links: DiffLinks, controls: str = "",
               matches: dict[str, list[dict]] | None = None) -> str:
    matches = matches or {}
    mean = title["mean_gain"]
    body = [f"<h1>{esc(title['name'])}</h1>",
            f"<p class=note>A: {esc(title['a'])} · B: {esc(title['b'])} · corpus {esc(title['corpus'])} · "
            f"{title['tokens']:,} tokens</p>",
            f"<p id=summary>B − A, log-prob of the actual next token, mean over all tokens: <b>{fmt(mean)}</b> nats "
            f"({'B predicts better' if (mean or 0) > 0 else 'B predicts worse'} on average)</p>", controls]
    doc_cols = [("doc_id", "num"), ("path", "txt"), ("tokens", "num"), ("mean_logprob_a", "num"),
                ("mean_logprob_b", "num"), ("mean_gain", "num"), ("total_gain", "num")]
    body += [f"<h2>Documents ({len(docs)}), best for B first</h2>",
             table(doc_cols, ([r[c] for c, _ in doc_cols] for r in docs), table_id="docs",
                   links={0: [links.doc(r["doc_id"]) for r in docs]})]
    tok_cols = [("tok", "num"), ("diff", "num"), ("logprob_a", "num"), ("logprob_b", "num"), ("doc_id", "num"),
                ("next", "txt"), ("context", "txt")]
    for name, rows in (("gains", gains), ("losses", losses)):
        body += [f"<h2>Largest {name}: tokens B predicts {'better' if name == 'gains' else 'worse'} than A</h2>",
                 "<p class=note>diff: B − A for predicting <i>next</i> after the «marked» token</p>",
                 table(tok_cols, ([r[c] for c, _ in tok_cols] for r in rows), table_id=f"token-{name}",
                       links={0: [links.doc(r["doc_id"], r["tok"] + 1) for r in rows]})]
    if neurons:
        ncols = [("hook", "txt"), ("layer", "num"), ("neuron", "num"), ("mean_abs_diff", "num"), ("corr", "num"),
                 ("top_overlap", "num"), ("mean_a", "num"), ("mean_b", "num"), ("std_a", "num"), ("std_b", "num")]
        body += [f"<h2>Neurons whose activations changed ({len(neurons)})</h2>",
                 table(ncols, ([r[c] for c, _ in ncols] for r in neurons), table_id="neurons",
                       links={2: [links.neuron(NeuronId(r["hook"], r["layer"], r["neuron"])) for r in neurons]})]
    for order, rows in matches.items():
        if rows:
            cols = [(c, "txt" if c == "hook" else "num") for c in rows[0]]
            title_ = ("clearest A → B correspondences" if order == "best" else "A neurons without a good B twin")
            body += [f"<h2>Neuron matches: {title_}</h2>",
                     table(cols, ([r[c] for c, _ in cols] for r in rows), table_id=f"match-{order}")]
    for what, rows in weights.items():
        if rows:
            cols = [(c, "txt" if c in ("what", "param") else "num") for c in rows[0]]
            body += [f"<h2>Weights that changed most: {esc(what)}s</h2>",
                     table(cols, ([r[c] for c, _ in cols] for r in rows), table_id=f"weights-{what}")]
    return page(f"{title['name']}: A vs B", "\n".join(body), nav=[("index", links.index)])


def doc_page(title: dict[str, Any], d: DocPage, links: DiffLinks, controls: str = "",
             window_link: Callable[[int], str] | None = None) -> str:
    """Each token coloured by B − A: its log-prob, or with a neuron (d.acts) that neuron's activation."""
    if d.acts is not None:
        values = {t: b - a for t, (a, b) in d.acts.items()}
        scale = max((abs(v) for v in values.values()), default=0.0) or 1.0
    else:
        values = {r["tok"]: r["diff"] for r in d.tokens if r["diff"] is not None}
        scale = max(0.5, float(np.quantile([abs(v) for v in values.values()] or [0.0], 0.98)))
    spans = []
    for r in d.tokens:
        gap = token_html(r["gap"]) if r["gap"] else ""
        tip = []
        if d.acts is not None and r["tok"] in d.acts:
            a, b = d.acts[r["tok"]]
            tip.append(f"neuron B − A {b - a:+.4g} (A {a:.4g}, B {b:.4g})")
        if r["diff"] is not None:
            tip.append(f"{'log-prob ' if d.acts is not None else ''}B − A {r['diff']:+.3f} "
                       f"(A {r['logprob_a']:.3f}, B {r['logprob_b']:.3f})")
        cls = "t pk" if r["tok"] == d.anchor else "t"
        v = values.get(r["tok"])
        style = f' style="background:{colour(v, scale)}"' if v is not None else ""
        data = f' data-v="{esc(" · ".join(tip))}"' if tip else ""
        spans.append(f'{gap}<span class="{cls}" id="t{r["tok"]}"{style}{data}>{token_html(r["token"])}</span>')
    gains = [r["diff"] for r in d.tokens if r["diff"] is not None]
    shown = (f"its {d.total:,} mined tokens" if len(d.tokens) == d.total else
             f"the first {len(d.tokens):,} of its {d.total:,} mined tokens" if d.acts is None else
             f"tokens {d.tokens[0]['tok']:,}–{d.tokens[-1]['tok']:,} of its {d.total:,} mined tokens")
    if d.acts is None:
        what = (f"Each token is coloured by how much better B predicted it than A did (log-prob of this "
                f"token given the text before it): orange where B is better, blue where worse, full colour at "
                f"±{fmt(scale, 3)} nats. Hover a token for both log-probs.")
    else:
        n = d.nid
        what = (f"Each token is coloured by {esc(n.hook)} layer {n.layer} neuron {n.neuron}'s activation under B "
                f"minus under A (replayed through both): orange where B's is higher, blue where lower, full colour at "
                f"±{fmt(scale, 3)}. Hover a token for both activations and both log-probs.")
    body = [f"<h1>Document {d.doc_id}: {esc(d.path)}</h1>",
            f"<p class=note>A: {esc(title['a'])} · B: {esc(title['b'])} · {shown}; mean B − A log-prob over them "
            f"{fmt(float(np.mean(gains)) if gains else None)} nats</p>",
            f"<p class=note id=colouring>{what}</p>", controls]
    body += [window_moves(window_link, d.earlier, d.later),
             f'<div class="toks doc" id="doc-text">{"".join(spans)}</div>']
    nav = [("index", links.index)] + ([("neuron", links.neuron(d.nid))] if d.nid is not None else [])
    return page(f"doc {d.doc_id}: A vs B", "\n".join(body), nav=nav)


def neuron_page(nid: NeuronId, p: dict[str, Any], links: DiffLinks) -> str:
    stats = {k: v for k, v in p["stats"].items() if k not in ("hook", "layer", "neuron")} | p["extra"]
    body = [f"<h1>{esc(nid.hook)} · layer {nid.layer} · neuron {nid.neuron}: A vs B</h1>",
            table([(k, "num") for k in stats], [list(stats.values())], table_id="stats", sortable=False),
            "<p class=note>corr: correlation of A's and B's activations over the mined tokens; top_overlap: share "
            "of A's top-k tokens also in B's top-k.</p>"]
    cols = [("rank", "num"), ("value", "num"), ("token", "txt"), ("doc_id", "num"), ("context", "txt")]
    for s, heading in DIFF_SETS.items():
        rows = p["sets"][s]
        if rows:
            body += [f"<h2>{esc(heading)}</h2>"]
            if p.get("traces", {}).get(s):
                body += [f'<div class="set" id="traces-{s}">', *(trace_html(t) for t in p["traces"][s]), "</div>",
                         f"<p class=note>the first {len(p['traces'][s])} replayed through both models: the tokens "
                         "around each one coloured by the neuron's activation under A (upper row) and B (lower "
                         "row), on one scale; hover a token for its value. All of them:</p>"]
            body += [table(cols, ([r[c] for c, _ in cols] for r in rows), table_id=f"set-{s}",
                           links={2: [links.doc(r["doc_id"], r["tok"], nid) for r in rows]})]
    return page(f"{nid.hook} {nid.layer}:{nid.neuron}: A vs B", "\n".join(body), nav=[("index", links.index)])


def trace_html(t: dict) -> str:
    """One replayed context: A's and B's activations of the neuron at each token, on one colour scale."""
    from .html import tokens_html

    lo, hi = max(0, t["peak"] - TRACE_BEFORE), min(len(t["a"]), t["peak"] + TRACE_AFTER + 1)
    window = {side: t[side][lo:hi] for side in ("a", "b")}
    scale = max((abs(v) for v in window["a"] + window["b"]), default=0.0) or 1.0
    start, end = t["doc_span"]
    peak = t["peak"]
    meta = (f"#{t['rank']} · B − A {fmt(t['value'])} at the marked token (A {fmt(t['a'][peak])}, "
            f"B {fmt(t['b'][peak])}) · doc {t['doc_id']} chars {start}–{end}")
    more = ('<span class="note">… </span>' if lo else "",
            '<span class="note"> …</span>' if hi < len(t["a"]) else "")
    rows = "".join(f'<div class="toks" data-model="{side}"><span class="note">{side.upper()} </span>{more[0]}'
                   f'{tokens_html(t["context_tokens"][lo:hi], window[side], scale, peak - lo)}{more[1]}</div>'
                   for side in ("a", "b"))
    return f'<div class="ex" data-rank="{t["rank"]}"><div class="meta">{esc(meta)}</div>{rows}</div>'


# ---------------------------------------------------------------- the static site


def write_diff_site(root: Path, con: duckdb.DuckDBPyConnection, nids: Sequence[NeuronId], out: Path) -> str:
    from ..export import publish_dir

    replay = DiffReplay(root) if nids else None
    docs = paged_docs(con)
    neurons = set(nids)

    def build(tmp: Path) -> None:
        title = models_title(root, con)
        first_tok = dict(con.execute("SELECT doc_id, min(tok) FROM tokens GROUP BY doc_id").fetchall())
        links = static_links(0, docs, neurons, first_tok)
        weights = {w: weight_rows(con, w) for w in ("param", "neuron", "head")}
        matches = {order: match_rows(con, order) for order in ("best", "worst")}
        (tmp / "index.html").write_text(index_page(title, doc_rows(con), token_rows(con, "gains"),
                                                   token_rows(con, "losses"), neuron_rows(con, nids), weights, links,
                                                   matches=matches), encoding="utf-8")
        deep = static_links(1, docs, neurons, first_tok)
        (tmp / "docs").mkdir()
        for d in sorted(docs):
            html = doc_page(title, doc_page_data(con, d, document.STATIC_DOC_TOKENS), deep)
            (tmp / "docs" / f"{d}.html").write_text(html, encoding="utf-8")
        (tmp / "neurons").mkdir()
        for n in nids:
            (tmp / "neurons" / f"{n.hook}-{n.layer}-{n.neuron}.html").write_text(
                neuron_page(n, neuron_page_data(con, n, replay), deep), encoding="utf-8")

    publish_dir(out, build)
    return f"wrote a diff viewer of {len(docs)} documents and {len(nids)} neurons to {out}/index.html"
