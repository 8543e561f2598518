"""HTML building blocks. Everything that came from the store (token text, paths, labels) passes
through `esc`/`token_html`; data for scripts goes through `script_json`. Pages carry a
Content-Security-Policy that allows only the viewer's own inline script (by its hash), so even
markup that slipped through could not run."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import unicodedata
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Sequence


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.{digits}g}"
    return str(value)


def data_v(value: Any) -> str:
    """A sortable cell's machine value (empty for missing)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return esc(repr(float(value)) if isinstance(value, float) else value)


# bidirectional overrides/isolates and zero-width characters would reorder or hide the page's text
_INVISIBLE = {0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF, *range(0x202A, 0x202F),
              *range(0x2066, 0x206A)}


def token_html(token: str) -> str:
    """A token's text, escaped, with newlines/tabs shown as arrows and control, bidi and zero-width
    characters as visible code points."""
    out = []
    for ch in token:
        cp = ord(ch)
        if ch == "\n":
            out.append('<span class="ctl">\u21b5</span>\n')
        elif ch == "\t":
            out.append('<span class="ctl">\u21e5</span>')
        elif cp in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn"):
            out.append(f'<span class="ctl">&lt;U+{cp:04X}&gt;</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: no `</script>`, no `<!--`, no U+2028."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def colour(value: float, scale: float) -> str:
    """Background for an activation: orange for positive, blue for negative, alpha by |value| / scale."""
    if not scale or not math.isfinite(value):
        return "transparent"
    a = min(1.0, abs(value) / scale)
    rgb = "255, 140, 0" if value >= 0 else "31, 95, 191"
    return f"rgba({rgb}, {a:.3f})"


def tokens_html(tokens: Sequence[str], values: Sequence[float], scale: float, peak: int | None = None) -> str:
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values)):
        cls = "t pk" if i == peak else "t"
        spans.append(f'<span class="{cls}" style="background:{colour(v, scale)}" data-v="{fmt(float(v))}">{token_html(tok)}</span>')
    return "".join(spans)


def table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]], table_id: str | None = None,
          sortable: bool = True, links: dict[int, Sequence[str | None]] | None = None) -> str:
    """columns: (label, 'num' | 'txt'); rows: cell values; links: column -> href per row."""
    head = "".join(f'<th data-type="{kind}" data-key="{esc(label)}"{" class=txt" if kind == "txt" else ""}>'
                   f'{esc(label)}</th>' for label, kind in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for c, ((_, kind), value) in enumerate(zip(columns, row)):
            text = esc(fmt(value)) if kind == "num" else token_html(str(value if value is not None else ""))
            href = links.get(c)[i] if links and c in links else None
            if href:
                text = f'<a href="{esc(href)}">{text}</a>'
            if kind == "num":
                cells.append(f'<td data-v="{data_v(value)}">{text}</td>')
            else:
                cells.append(f'<td class="txt">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    attrs = (f' id="{esc(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return resources.files("mining.viewer").joinpath("assets", name).read_text(encoding="utf-8")


def page(title: str, body: str, nav: Sequence[tuple[str, str]] = ()) -> str:
    """A whole page: CSS and the viewer script inline (it opens from the file system, offline)."""
    script = _asset("viewer.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "base-uri 'none'; form-action 'self'")
    links = "".join(f'<a href="{esc(href)}">{esc(label)}</a>' for label, href in nav)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_asset('viewer.css')}</style></head>\n"
        f"<body><nav>{links}</nav>\n{body}\n<div id=\"tip\" hidden></div>\n<script>{script}</script></body></html>\n"
    )
