"""`mine serve STORE`: the viewer's pages built on demand from DuckDB, on 127.0.0.1 only.

For stores too large to export whole: the index ranks neurons server-side (hook, layer, metric,
order, limit in the URL), and a neuron or head page replays just its own contexts when asked for.
One lock serializes page building: DuckDB connections and the model are not shared across threads.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UserError
from ..examples import NeuronId, attach, pick_examples, random_contexts
from ..export import check_exist, default_hook, require_single_model
from ..query import connect, has_tables, local_root
from ..replay import Replayer
from . import data, diffview, document
from .html import esc, page
from .pages import SERVED, head_page, index_page, neuron_page
from .site import head_patterns, pattern_contexts

BY = ("kurtosis", "skew", "max", "min", "abs_max", "mean", "std", "frac_active")


class _Pages:
    """URL -> (status, html): one lock (DuckDB connections and the models are not shared across threads), bad
    input an error page (400), unknown paths 404. Subclasses route the path's parts."""

    lock: threading.Lock

    def handle(self, url: str) -> tuple[int, str]:
        parts = urlsplit(url)
        path = [unquote(p) for p in parts.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            try:
                html = self.route(path, query)
            except UserError as e:
                return 400, _error_page(str(e))
        return (200, html) if html is not None else (404, _error_page("no such page: " + parts.path))

    def route(self, path: list[str], query: dict[str, str]) -> str | None:
        raise NotImplementedError

    def close(self, wait_s: float = 30.0) -> None:
        """Close the DuckDB connection from the main thread, after the page in flight (if any) is done: left to the
        interpreter's shutdown, a connection used from handler threads is destroyed while the runtime tears down,
        where DuckDB is known to hang or abort (duckdb/duckdb#13904)."""
        if self.lock.acquire(timeout=wait_s):
            try:
                self.con.close()
            finally:
                self.lock.release()


class Viewer(_Pages):
    """Builds pages for one store."""

    def __init__(self, store: str | Path, k: int = 10, per_band: int = 2, random: int = 5):
        self.root = local_root(store)
        self.con = connect(store)
        require_single_model(self.con, store)
        self.replayer = Replayer(self.root)
        self.k, self.per_band = k, per_band
        self.random = random_contexts(self.con, random)
        self.hooks = [r[0] for r in self.con.execute("SELECT DISTINCT hook FROM neurons ORDER BY hook").fetchall()]
        self.lock = threading.Lock()

    def route(self, path: list[str], query: dict[str, str]) -> str | None:
        if not path:
            return self.index(query)
        if path[0] == "neuron" and len(path) == 4:
            return self.neuron(path[1], _int(path[2], "layer"), _int(path[3], "neuron"))
        if path[0] == "head" and len(path) == 3:
            return self.head(_int(path[1], "layer"), _int(path[2], "head"))
        if path[0] == "doc" and len(path) == 2:
            return self.document(_int(path[1], "document"), query)
        return None

    def index(self, q: dict[str, str]) -> str:
        hook = q.get("hook", default_hook(self.hooks))
        if hook not in self.hooks:
            raise UserError(f"hook {hook!r} is not in this store; it has {', '.join(self.hooks)}")
        by = q.get("by", "kurtosis")
        if by not in BY:
            raise UserError(f"by must be one of {', '.join(BY)}")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise UserError("order must be asc or desc")
        layer = _int(q.get("layer", "-1"), "layer")
        limit = min(max(_int(q.get("limit", "500"), "limit"), 1), 5000)
        rows = data.index_rows(self.con, hook=hook, layer=layer, by=by, order=order, limit=limit)
        controls = _controls(self.hooks, hook, layer, by, order, limit)
        return index_page(data.store_title(self.con, self.root), rows, data.head_rows(self.con), SERVED, controls,
                          docs=document.index_documents(self.con))

    def neuron(self, hook: str, layer: int, neuron: int) -> str:
        nid = NeuronId(hook, layer, neuron)
        check_exist(self.con, [nid])
        by_neuron = {nid: pick_examples(self.con, nid, self.k, self.per_band, self.random)}
        attach(self.root, self.replayer, by_neuron)
        return neuron_page(data.neuron_page(self.con, nid, by_neuron[nid], data.context_length(self.root)), SERVED)

    def document(self, doc_id: int, q: dict[str, str]) -> str:
        """/doc/ID: coloured by surprise; ?hook=&layer=&neuron= by that neuron (a window of contexts, replayed), around
        token tok= (marked) or from token start=."""
        title = data.store_title(self.con, self.root)
        if not {"layer", "neuron"} & set(q):
            d = document.surprise_document(self.con, doc_id)
            return document.document_page(title, d, "/", controls=document.neuron_form(doc_id, self.hooks, None))
        nid, anchor, start = _colour_by(q)
        d = document.neuron_document(self.root, self.con, self.replayer, doc_id, nid, anchor, start)
        return document.document_page(title, d, "/", SERVED.neuron(nid), document.window_link(doc_id, nid),
                                      document.neuron_form(doc_id, self.hooks, nid))

    def head(self, layer: int, head: int) -> str:
        scores = data.head_scores(self.con, layer, head)
        if not scores:
            raise UserError(f"head {layer}.{head} is not in this store's heads table (mine with stats.heads: true)")
        patterns = head_patterns(self.replayer, layer, head, pattern_contexts(self.root, self.con))
        return head_page(layer, head, scores, patterns, SERVED)


class DiffViewer(_Pages):
    """The same interface for a diff store: the index ranks neurons by neuron-diff, documents and neurons on demand."""

    def __init__(self, store: str | Path):
        self.root = local_root(store)
        self.con = connect(store)
        self.title = diffview.models_title(self.root, self.con)
        self.replay = diffview.DiffReplay(self.root)
        self.hooks = [r[0] for r in self.con.execute("SELECT DISTINCT hook FROM neuron_diff ORDER BY hook").fetchall()
                      ] if has_tables(self.con, "neuron_diff") else []
        self.lock = threading.Lock()

    def route(self, path: list[str], query: dict[str, str]) -> str | None:
        if not path:
            return self.index(query)
        if path[0] == "doc" and len(path) == 2:
            return self.document(_int(path[1], "document"), query)
        if path[0] == "neuron" and len(path) == 4:
            nid = NeuronId(path[1], _int(path[2], "layer"), _int(path[3], "neuron"))
            return diffview.neuron_page(nid, diffview.neuron_page_data(self.con, nid, self.replay), diffview.SERVED)
        return None

    def document(self, doc_id: int, q: dict[str, str]) -> str:
        """/doc/ID: coloured by B − A log-prob; ?hook=&layer=&neuron= by that neuron's B − A activation over a window
        of contexts replayed through both models, around token tok= (marked) or from token start=."""
        form = (lambda nid: document.neuron_form(doc_id, self.hooks, nid, "by B − A log-prob")) if self.hooks else (
            lambda nid: "")
        if not {"layer", "neuron"} & set(q):
            return diffview.doc_page(self.title, diffview.doc_page_data(self.con, doc_id), diffview.SERVED, form(None))
        if not self.hooks:
            raise UserError("this diff store compared no neurons (hooks: []): its documents are coloured by log-prob "
                            "only")
        nid, anchor, start = _colour_by(q)
        d = diffview.neuron_doc_page_data(self.con, self.replay, doc_id, nid, anchor, start)
        return diffview.doc_page(self.title, d, diffview.SERVED, form(nid), document.window_link(doc_id, nid))

    def index(self, q: dict[str, str]) -> str:
        hook = q.get("hook", default_hook(self.hooks))
        if self.hooks and hook not in self.hooks:
            raise UserError(f"hook {hook!r} is not in this store; it has {', '.join(self.hooks)}")
        by, layer = q.get("by", "mean_abs_diff"), _int(q.get("layer", "-1"), "layer")
        limit = min(max(_int(q.get("limit", "50"), "limit"), 0), 5000)
        nids = diffview.pick_neurons(self.con, hook, top=limit, by=by, layer=layer) if self.hooks else []
        controls = _diff_controls(self.hooks, hook, layer, by, limit) if self.hooks else ""
        weights = {w: diffview.weight_rows(self.con, w) for w in ("param", "neuron", "head")}
        return diffview.index_page(self.title, diffview.doc_rows(self.con), diffview.token_rows(self.con, "gains"),
                                   diffview.token_rows(self.con, "losses"), diffview.neuron_rows(self.con, nids),
                                   weights, diffview.SERVED, controls,
                                   matches={o: diffview.match_rows(self.con, o) for o in ("best", "worst")})


def _diff_controls(hooks: list[str], hook: str, layer: int, by: str, limit: int) -> str:
    return ('<form method="get" action="/" id="rank">neurons: ' + _select("hook", hooks, hook)
            + f'<label>layer <input name="layer" value="{layer}" size="4"></label> '
            + _select("by", diffview.NEURON_ORDERS, by)
            + f'<label>limit <input name="limit" value="{limit}" size="5"></label> '
            + '<button type="submit">rank</button> <span class="note">corr: least correlated first; overlap: '
            'fewest shared top tokens first</span></form>')


def _colour_by(q: dict[str, str]) -> tuple[NeuronId, int | None, int | None]:
    """A document page's ?hook=&layer=&neuron= (the neuron to colour by), tok= (the token marked) and start= (the
    window's first token)."""
    nid = NeuronId(q.get("hook", "mlp.hook_post"), _int(q.get("layer", ""), "layer"),
                   _int(q.get("neuron", ""), "neuron"))
    return nid, *(_int(q[k], k) if k in q else None for k in ("tok", "start"))


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text!r}") from None


def _error_page(message: str) -> str:
    return page("error", f"<h1>Cannot show that</h1><p id=error>{esc(message)}</p>", nav=[("index", "/")])


def _select(name: str, options, current) -> str:
    opts = "".join(f'<option{" selected" if o == current else ""}>{esc(o)}</option>' for o in options)
    return f'<label>{name} <select name="{name}">{opts}</select></label> '


def _controls(hooks: list[str], hook: str, layer: int, by: str, order: str, limit: int) -> str:
    return ('<form method="get" action="/" id="rank">' + _select("hook", hooks, hook)
            + f'<label>layer <input name="layer" value="{layer}" size="4"></label> '
            + _select("by", BY, by) + _select("order", ("desc", "asc"), order)
            + f'<label>limit <input name="limit" value="{limit}" size="5"></label> '
            + '<button type="submit">rank</button> <span class="note">layer -1: all layers</span></form>')


def make_server(viewer: Viewer | DiffViewer, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            try:
                if host not in ("127.0.0.1", "localhost", "::1"):  # DNS rebinding: a foreign name for loopback
                    status, body = 403, _error_page("only http://127.0.0.1 and http://localhost may ask")
                else:
                    status, body = viewer.handle(self.path)
            except Exception as e:  # a bug, not bad input: answer, log one line, keep serving
                print(f"error: {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
                status, body = 500, _error_page(f"internal error: {type(e).__name__}")
            payload = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt: str, *args) -> None:
            pass

    try:
        return ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1 ({e.strerror}); choose another port") from None


def serve(store: str | Path, port: int) -> int:
    con = connect(store)
    diff = diffview.is_diff_store(con)
    con.close()
    viewer = DiffViewer(store) if diff else Viewer(store)
    server = make_server(viewer, port)
    print(f"serving {store} on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        viewer.close()
    return 0
