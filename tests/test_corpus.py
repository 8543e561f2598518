"""Corpus sources and the deterministic split into contexts and shards."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.corpus import check_source, iter_documents
from mining.errors import UserError
from mining.shards import build_shards, iter_contexts, special_tokens
from mining.spec import CorpusSpec


def corpus_dir(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("Second file. " * 40)
    (d / "a.txt").write_text("First file, with é and 日本 and emoji 🙂. " * 30)
    (d / "sub" / "c.jsonl").write_text(json.dumps({"text": "json doc one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row zero", "parquet row one"]}), d / "sub" / "d.parquet")
    return d


def test_files_in_sorted_order_with_all_formats(tmp_path):
    d = corpus_dir(tmp_path)
    docs = list(iter_documents(CorpusSpec(source=f"files:{d}/**/*")))
    assert [x.doc_id for x in docs] == list(range(6))
    assert docs[0].path.endswith("a.txt") and docs[1].path.endswith("b.txt")
    assert [x.text for x in docs[2:]] == ["json doc one", "json two", "parquet row zero", "parquet row one"]
    assert docs == list(iter_documents(CorpusSpec(source=f"files:{d}/**/*")))


def test_bad_sources_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="no files match"):
        check_source(CorpusSpec(source=f"files:{tmp_path}/none/*.txt"))
    with pytest.raises(UserError, match="unknown built-in"):
        check_source(CorpusSpec(source="builtin:nope"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(iter_documents(CorpusSpec(source=f"files:{tmp_path}/latin1.txt")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        list(iter_documents(CorpusSpec(source=f"files:{tmp_path}/bad.jsonl")))
    (tmp_path / "f.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(UserError, match="text_field"):
        list(iter_documents(CorpusSpec(source=f"files:{tmp_path}/f.jsonl")))


def test_builtin_corpora_are_real_text():
    docs = list(iter_documents(CorpusSpec(source="builtin:python-docs", max_docs=5)))
    assert len(docs) == 5 and all(len(d.text) > 50 for d in docs)
    code = list(iter_documents(CorpusSpec(source="builtin:python-stdlib", max_docs=3)))
    assert len(code) == 3 and any("def " in d.text or "import " in d.text for d in code)


def test_dataset_source_from_local_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma delta"]}).save_to_disk(str(tmp_path / "ds"))
    docs = list(iter_documents(CorpusSpec(source=f"dataset:{tmp_path / 'ds'}")))
    assert [d.text for d in docs] == ["alpha beta", "gamma delta"]


def test_contexts_cover_text_exactly(tmp_path, smol_tokenizer):
    d = corpus_dir(tmp_path)
    spec = CorpusSpec(source=f"files:{d}/**/*", context_length=32, max_tokens=10_000)
    docs = list(iter_documents(spec))
    specials = special_tokens(smol_tokenizer, "auto", "<|endoftext|>")
    assert specials.prefix == (smol_tokenizer.convert_tokens_to_ids("<|endoftext|>"),) and specials.suffix == ()
    counts = {}
    rows = list(iter_contexts(docs, smol_tokenizer, 32, 10_000, specials, counts))
    assert all(len(r.ids) <= 31 for r in rows)
    assert [r.tok0 for r in rows] == list(np.cumsum([0] + [len(r.ids) for r in rows[:-1]]))
    for doc in docs:  # the spans tile each document and the ids decode back to it
        mine = [r for r in rows if r.doc_id == doc.doc_id]
        spans = [s for r in mine for s in r.spans]
        assert spans[0][0] == 0 and spans[-1][1] == len(doc.text)
        assert smol_tokenizer.decode([i for r in mine for i in r.ids]) == doc.text
        assert "".join(t for r in mine for t in r.texts) == doc.text or "é" in doc.text
        assert counts[doc.doc_id] == sum(len(r.ids) for r in mine)
    for a, b in zip(rows, rows[1:]):  # next_id links a context to the following one of its document
        if a.doc_id == b.doc_id:
            assert a.next_id == b.ids[0]
        else:
            assert a.next_id == -1


def test_max_tokens_exact_and_shards_whole(tmp_path, smol_tokenizer):
    d = corpus_dir(tmp_path)
    docs = list(iter_documents(CorpusSpec(source=f"files:{d}/**/*")))
    specials = special_tokens(smol_tokenizer, "auto", "<|endoftext|>")
    rows = list(iter_contexts(docs, smol_tokenizer, 32, 250, specials, {}))
    assert sum(len(r.ids) for r in rows) == 250
    shards = build_shards(rows, specials, 32, 64, pad_id=2)
    assert sum(s.n_tokens for s in shards) == 250
    assert all(s.n_tokens >= 64 for s in shards[:-1])
    grid = np.concatenate([s.tok_grid()[s.tok_grid() >= 0] for s in shards])
    assert np.array_equal(grid, np.arange(250))
    for s in shards:
        assert (s.ids[:, 0] == specials.prefix[0]).all() and s.first.tolist() == [1] * len(s.ids)
        assert len(s.token_text) == s.n_tokens


def test_bos_rules(smol_tokenizer, minilm_tokenizer):
    bert = special_tokens(minilm_tokenizer, "auto", None)
    assert bert.prefix == (minilm_tokenizer.cls_token_id,) and bert.suffix == (minilm_tokenizer.sep_token_id,)
    assert special_tokens(smol_tokenizer, "none", "<|endoftext|>").prefix == ()
    assert special_tokens(smol_tokenizer, "<|im_start|>", None).prefix == (1,)
    with pytest.raises(UserError, match="corpus.bos"):
        special_tokens(smol_tokenizer, "<not-a-token>", None)
