"""A context as the queries show it: its tokens' spans and the document's text between them, which WordPiece's
spans leave out (the bench's synthetic store is laid out that way: each token's span skips the space before it)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.bench_store import synthetic_store
from mining.query import connect
from mining.store import DOC_GROUP_BYTES, Store


def test_contexts_read_the_document_between_token_spans(tmp_path):
    root, _ = synthetic_store(tmp_path / "s", 20_000, 1, 4, 3)
    con = connect(root)
    docs = dict(con.execute("SELECT doc_id, text FROM docs").fetchall())
    toks = [t for (t,) in con.execute("SELECT DISTINCT tok FROM top_examples ORDER BY tok LIMIT 6").fetchall()]
    toks += [0, 126, 127]  # a document's first token, a context's last, the next context's first
    rows = con.execute("SELECT tok, doc_id, context FROM tok_contexts($toks, 4)", {"toks": toks}).fetchall()
    assert sorted(t for t, _, _ in rows) == sorted(toks)
    for tok, doc_id, context in rows:
        start, end, first, last = con.execute(
            "SELECT p.char_start, p.char_end, min(x.char_start), max(x.char_end) FROM tokens AS p "
            "INNER JOIN tokens AS x ON x.ctx = p.ctx AND x.pos BETWEEN p.pos - 4 AND p.pos + 4 "
            "WHERE p.tok = $t GROUP BY ALL", {"t": tok}).fetchone()
        text = docs[doc_id]
        assert context == text[first:start] + "«" + text[start:end] + "»" + text[end:last], tok
        assert " " in context
        assert con.execute("SELECT tok_context($t, 4)", {"t": tok}).fetchone()[0] == context
    con.close()


def test_docs_are_written_in_row_groups_of_about_a_megabyte_of_text(tmp_path):
    n = 30
    text = ["x" * (DOC_GROUP_BYTES // 10)] * n
    Store(tmp_path).write_docs(pa.table({"doc_id": np.arange(n), "text": text}))
    meta = pq.ParquetFile(tmp_path / "docs.parquet").metadata
    assert meta.num_rows == n and meta.num_row_groups == 3
    Store(tmp_path).write_docs(pa.table({"doc_id": np.arange(2), "text": ["", ""]}))  # no text: one group
    assert pq.ParquetFile(tmp_path / "docs.parquet").metadata.num_row_groups == 1
