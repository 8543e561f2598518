"""The viewer's three pages (index, neuron, head) as HTML strings, the same for the static site and
`mine serve`; only the links differ (see Links)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import quote

import numpy as np

from ..examples import Example, NeuronId
from .data import METRICS, NeuronPage
from .document import DocLink, documents_section, served_doc_link
from .html import esc, fmt, page, script_json, table, token_html, tokens_html


@dataclass(frozen=True)
class Links:
    """Where pages live. Static: files relative to the page; served: absolute paths."""

    index: str
    neuron: Callable[[NeuronId], str | None]
    head: Callable[[int, int], str | None]
    doc: DocLink = lambda doc_id, tok=None, nid=None: None


def static_links(depth: int, neurons: set[NeuronId], heads: set[tuple[int, int]],
                 doc: Callable[[int], DocLink] | None = None) -> Links:
    """doc: depth -> the static document links (see document.static_doc_link); none without it."""
    up = "../" * depth
    return Links(
        index=f"{up}index.html",
        neuron=lambda n: f"{up}neurons/{n.hook}-{n.layer}-{n.neuron}.html" if n in neurons else None,
        head=lambda layer, head: f"{up}heads/{layer}-{head}.html" if (layer, head) in heads else None,
        **({"doc": doc(depth)} if doc else {}),
    )


SERVED = Links(index="/", neuron=lambda n: f"/neuron/{quote(n.hook)}/{n.layer}/{n.neuron}",
               head=lambda layer, head: f"/head/{layer}/{head}", doc=served_doc_link)


# ---------------------------------------------------------------- index


def index_page(title: dict[str, Any], neurons: list[dict], heads: list[dict], links: Links,
               controls: str = "", docs: Sequence[dict] = ()) -> str:
    cols = [("hook", "txt"), ("layer", "num"), ("neuron", "num")] + [(m, "num") for m in METRICS]
    optional = [c for c in ("top_token", "mean_dla", "coherence") if neurons and c in neurons[0]]
    cols += [(c, "txt" if c == "top_token" else "num") for c in optional]
    keys = [c for c, _ in cols]
    nid = [NeuronId(r["hook"], r["layer"], r["neuron"]) for r in neurons]
    body = [f"<h1>{esc(title['name'])}</h1>",
            f"<p class=note>model {esc(title['model'])} · corpus {esc(title['corpus'])}"
            f"{' · ' + format(title['tokens'], ',') + ' tokens' if title.get('tokens') else ''}</p>", controls,
            f"<h2>Neurons (<span id=neuron-count>{len(neurons)}</span> of {len(neurons)} shown)</h2>",
            '<p><input class="filter" id="neuron-filter" data-table="neurons" data-count="neuron-count" '
            'placeholder="filter: words, or kurtosis>10 layer=3 frac_active<0.05" aria-label="filter neurons"></p>',
            table(cols, ([r.get(k) for k in keys] for r in neurons), table_id="neurons",
                  links={2: [links.neuron(n) for n in nid]})]
    if heads:
        hcols = [("layer", "num"), ("head", "num")] + [(k, "num") for k in heads[0] if k not in ("layer", "head")]
        hkeys = [c for c, _ in hcols]
        body += [f"<h2>Attention heads (<span id=head-count>{len(heads)}</span>)</h2>",
                 '<p><input class="filter" id="head-filter" data-table="heads" data-count="head-count" '
                 'placeholder="filter: induction>0.3 layer=5" aria-label="filter heads"></p>',
                 table(hcols, ([r.get(k) for k in hkeys] for r in heads), table_id="heads",
                       links={1: [links.head(r["layer"], r["head"]) for r in heads]})]
    body.append(documents_section(list(docs), links.doc))
    return page(f"{title['name']}: neurons", "\n".join(body), nav=[("index", links.index)])


# ---------------------------------------------------------------- neuron


SET_TITLES = {"top": "Top contexts", "bottom": "Most negative tokens", "band": "Quantile bands",
              "random": "Random contexts"}


def neuron_page(p: NeuronPage, links: Links) -> str:
    n = p.nid
    s = p.stats
    scale = max(abs(s.get("min") or 0.0), abs(s.get("max") or 0.0)) or 1.0
    kind = "latent" if n.hook.endswith(".hook_sae_acts_post") else "neuron"  # an SAE's latents (mining/sae.py)
    body = [f"<h1>{esc(n.hook)} · layer {n.layer} · {kind} {n.neuron}</h1>"]
    stats = {k: s.get(k) for k in ("count", *METRICS)} | p.extra
    body.append(table([(k, "num") for k in stats], [list(stats.values())], table_id="stats", sortable=False))
    side = []
    if p.histogram:
        side.append(f"<div><h2>Activation histogram</h2>{histogram_svg(p.histogram, s.get('min'), s.get('max'))}"
                    "<p class=note>bar height: log(1 + tokens); bins are log-spaced (relative width 2^-bits)</p></div>")
    if p.quantiles:
        side.append("<div><h2>Quantiles</h2>" + table([("q", "num"), ("value", "num"), ("among firing", "num")],
                    ([r["q"], r["value"], r["value_firing"]] for r in p.quantiles), table_id="quantiles",
                    sortable=False) + "</div>")
    if side:
        body.append('<div class="row">' + "".join(side) + "</div>")
    for set_name in ("top", "bottom", "band", "random"):
        exs = [e for e in p.examples if e.set == set_name]
        if not exs:
            continue
        body.append(f'<h2>{SET_TITLES[set_name]}</h2><div class="set" id="set-{set_name}">')
        last_band = None
        for e in exs:
            if set_name == "band" and e.band != last_band:
                body.append(f"<h3>band {esc(e.band)} (values {fmt(e.band_lo)} to {fmt(e.band_hi)})</h3>")
                last_band = e.band
            body.append(example_html(e, scale, links.doc(e.context.doc_id, _anchor(e), n)))
        body.append("</div>")
    if p.logit_lens:
        body.append("<h2>Logit lens: tokens its output direction boosts and suppresses</h2>")
        body.append(table([("sign", "txt"), ("rank", "num"), ("token", "txt"), ("weight", "num")],
                          ([r["sign"], r["rank"], r["token"], r["weight"]] for r in p.logit_lens), table_id="logit-lens"))
    for sign, rows in p.dla_examples.items():
        if rows:
            body.append(f"<h2>Direct logit attribution: where it {'raises' if sign == 'positive' else 'lowers'} "
                        "the actual next token most</h2>")
            body.append(table([("rank", "num"), ("dla", "num"), ("token", "txt"), ("next token", "txt"),
                               ("context", "txt")],
                              ([r["rank"], r["dla"], r["token"], r["next_token"], r["context"]] for r in rows),
                              table_id=f"dla-{sign}"))
    return page(f"{n.hook} {n.layer}:{n.neuron}", "\n".join(body), nav=[("index", links.index)])


def _anchor(e: Example) -> int:
    """The token an example links to in its document: its peak."""
    assert e.context is not None
    return e.context.tok[e.peak_index]


def example_html(e: Example, scale: float, doc_link: str | None = None) -> str:
    c = e.context
    assert c is not None
    start, end = c.span
    value = f" · value {fmt(e.value)}" if e.value is not None else f" · max {fmt(max(e.activations))}"
    doc = f"doc {c.doc_id}"
    doc = f'<a class="in-doc" href="{esc(doc_link)}">{doc}</a>' if doc_link else doc
    meta = (f"{esc(f'#{e.rank}{value}')} · {doc} {esc(f'chars {start}–{end} · id {c.doc_id}:{start}-{end}')}")
    return (f'<div class="ex" data-set="{esc(e.set)}" data-rank="{e.rank}" data-id="{c.doc_id}:{start}-{end}">'
            f'<div class="meta">{meta}</div>'
            f'<div class="toks">{tokens_html(c.token, e.activations, scale, e.peak_index)}</div></div>')


def histogram_svg(bins: list[dict], vmin: float | None, vmax: float | None, width: int = 520,
                  height: int = 150) -> str:
    """Bars in bin order (the bins are log-spaced, so equal widths read as a symmetric-log axis)."""
    if not bins:
        return ""
    top = max(math.log1p(b["count"]) for b in bins) or 1.0
    w = width / len(bins)
    bars = []
    for i, b in enumerate(bins):
        h = (height - 20) * math.log1p(b["count"]) / top
        fill = "#ff8c00" if b["lo"] >= 0 else "#1f5fbf"
        lo = max(b["lo"], vmin) if vmin is not None else b["lo"]
        hi = min(b["hi"], vmax) if vmax is not None else b["hi"]
        bars.append(f'<rect x="{i * w:.2f}" y="{height - 20 - h:.2f}" width="{max(w - 0.5, 0.5):.2f}" '
                    f'height="{h:.2f}" fill="{fill}"><title>[{fmt(lo)}, {fmt(hi)}): {b["count"]} tokens</title></rect>')
    labels = [f'<text x="0" y="{height - 5}">{esc(fmt(vmin))}</text>',
              f'<text x="{width}" y="{height - 5}" text-anchor="end">{esc(fmt(vmax))}</text>']
    zero = next((i for i, b in enumerate(bins) if b["lo"] >= 0), None)
    if zero is not None and 0 < zero < len(bins):
        labels.append(f'<text x="{zero * w:.2f}" y="{height - 5}" text-anchor="middle">0</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="activation histogram">{"".join(bars)}{"".join(labels)}</svg>')


# ---------------------------------------------------------------- head


def head_page(layer: int, head: int, scores: dict[str, Any], patterns: Sequence[tuple[str, np.ndarray, list[str]]],
              links: Links) -> str:
    body = [f"<h1>Attention head {layer}.{head}</h1>"]
    if scores:
        body.append(table([(k, "num") for k in scores], [list(scores.values())], table_id="scores", sortable=False))
        body.append("<p class=note>prev_token, duplicate, induction: mean attention on repeated random tokens to "
                    "the previous position, the previous occurrence, and the token after it; bos: mean attention "
                    "to position 0; entropy in nats. Ablation: loss change when the head's output is zeroed or "
                    "replaced by its mean.</p>")
    for i, (title, pattern, labels) in enumerate(patterns):
        data = {"pattern": [[round(float(v), 3) for v in row] for row in pattern]}
        toks = "".join(f'<span class="t q">{token_html(t)}</span>' for t in labels)
        body.append(
            f'<h2>Attention pattern on {esc(title)}</h2>'
            f'<figure class="attn" id="attn-{i}"><canvas aria-label="attention pattern"></canvas>'
            f'<figcaption class="note">rows: query tokens, columns: key tokens; hover a token or a row to '
            f'colour the tokens by the attention it pays them. <span class="focus"></span></figcaption>'
            f'<div class="toks">{toks}</div>'
            f'<script type="application/json" class="attn-data">{script_json(data)}</script></figure>')
    return page(f"head {layer}.{head}", "\n".join(body), nav=[("index", links.index)])
