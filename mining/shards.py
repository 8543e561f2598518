"""Documents -> contexts -> shards, deterministically.

Each document is tokenized alone (no packing across documents, so no context mixes two
texts) and cut into chunks of `context_length - specials` tokens; every context gets the
tokenizer's special prefix (BOS/CLS) and suffix (SEP) back. Mined tokens are numbered in
corpus order: `tok` is that global index, `ctx` the context index, `pos` the position in the
context (specials are never mined, so a context with BOS starts at pos 1). Every token keeps
its character span in its document, so every example resolves to a corpus offset.
`max_tokens` is respected exactly by truncating the last context.

A shard is a run of whole contexts holding about `shard_tokens` tokens: the unit of work,
retry and resume. Shards carry their token ids (small), so actors never re-read the corpus.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from .corpus import Document
from .errors import UserError


@dataclass(frozen=True)
class Specials:
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


@dataclass
class Shard:
    """Whole contexts, as padded arrays (C contexts, L = context_length)."""

    index: int
    ids: np.ndarray  # (C, L) int64, padded with pad_id
    length: np.ndarray  # (C,) tokens in the context, specials included
    first: np.ndarray  # (C,) position of the first mined token
    mined: np.ndarray  # (C,) number of mined tokens
    tok0: np.ndarray  # (C,) global index of the first mined token
    ctx: np.ndarray  # (C,) global context index
    doc_id: np.ndarray  # (C,)
    spans: np.ndarray  # (C, L, 2) int32 character span in the document; -1 for specials/padding
    next_id: np.ndarray  # (C,) document token after the context's last mined token, -1 at the end
    token_text: np.ndarray  # (n_tokens,) object: each mined token's text, in tok order

    @property
    def first_tok(self) -> int:
        return int(self.tok0[0])

    @property
    def n_tokens(self) -> int:
        return int(self.mined.sum())

    def tok_grid(self) -> np.ndarray:
        """(C, L) global token index of each position, -1 where nothing is mined."""
        C, L = self.ids.shape
        pos = np.arange(L)[None, :]
        inside = (pos >= self.first[:, None]) & (pos < (self.first + self.mined)[:, None])
        return np.where(inside, self.tok0[:, None] + pos - self.first[:, None], -1)

    def head(self, n_contexts: int) -> "Shard":
        """The first n contexts, as a shard (a warm-up batch)."""
        return self.take(np.arange(min(n_contexts, len(self.ids))))

    def longest(self, n_contexts: int) -> "Shard":
        """The n longest contexts, in shard order, as a shard (a probe batch as large as any batch can be)."""
        order = np.argsort(-self.length, kind="stable")[:n_contexts]
        return self.take(np.sort(order))

    def take(self, rows: np.ndarray) -> "Shard":
        """These contexts (increasing indices), as a shard."""
        per_context = ("ids", "length", "first", "mined", "tok0", "ctx", "doc_id", "spans", "next_id")
        starts = np.concatenate([[0], np.cumsum(self.mined)])  # each context's first position in token_text
        text = np.concatenate([self.token_text[starts[r]:starts[r + 1]] for r in rows]) if len(rows) else self.token_text[:0]
        return dataclasses.replace(self, **{name: getattr(self, name)[rows] for name in per_context}, token_text=text)


def special_tokens(tokenizer: Any, bos: str, alias_bos: str | None) -> Specials:
    """The prefix/suffix each context gets. `auto`: the tokenizer's own rule; if it adds nothing,
    prepend the model's document separator (alias hint, else BOS, else EOS as GPT-2 does)."""
    if bos == "none":
        return Specials((), ())
    if bos != "auto":
        if bos not in tokenizer.get_vocab():
            raise UserError(f"corpus.bos: {bos!r} is not a token of this tokenizer")
        return Specials((tokenizer.convert_tokens_to_ids(bos),), ())
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            prefix, suffix = with_special[:i], with_special[i + len(plain) :]
            break
    else:
        prefix, suffix = [], []
    if prefix or suffix:
        return Specials(tuple(prefix), tuple(suffix))
    vocab = tokenizer.get_vocab()
    for candidate in (alias_bos, tokenizer.bos_token, tokenizer.eos_token):
        if candidate and candidate in vocab:
            return Specials((vocab[candidate],), ())
    return Specials((), ())


@dataclass(frozen=True)
class ContextRow:
    ctx: int
    doc_id: int
    ids: list[int]
    spans: list[tuple[int, int]]
    texts: list[str]
    next_id: int
    tok0: int


def iter_contexts(docs: Iterable[Document], tokenizer: Any, context_length: int, max_tokens: int,
                  specials: Specials, doc_tokens: dict[int, int]) -> Iterator[ContextRow]:
    """Yield contexts in corpus order; `doc_tokens[doc_id]` gets each document's mined token count."""
    chunk = context_length - len(specials.prefix) - len(specials.suffix)
    if chunk < 1:
        raise UserError(f"corpus.context_length: {context_length} leaves no room beside the special tokens")
    tok = ctx = 0
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for start in range(0, len(ids), chunk):
            take = min(chunk, len(ids) - start, max_tokens - tok)
            piece = slice(start, start + take)
            nxt = ids[start + take] if start + take < len(ids) else -1
            spans = [tuple(o) for o in offsets[piece]]
            texts = [doc.text[a:b] for a, b in spans]
            yield ContextRow(ctx, doc.doc_id, ids[piece], spans, texts, nxt, tok)
            doc_tokens[doc.doc_id] = doc_tokens.get(doc.doc_id, 0) + take
            tok += take
            ctx += 1
            if tok >= max_tokens:
                return


def build_shards(contexts: Iterable[ContextRow], specials: Specials, context_length: int,
                 shard_tokens: int, pad_id: int) -> list[Shard]:
    shards: list[Shard] = []
    pending: list[ContextRow] = []
    count = 0
    for row in contexts:
        pending.append(row)
        count += len(row.ids)
        if count >= shard_tokens:
            shards.append(_pack(len(shards), pending, specials, context_length, pad_id))
            pending, count = [], 0
    if pending:
        shards.append(_pack(len(shards), pending, specials, context_length, pad_id))
    return shards


def _pack(index: int, rows: list[ContextRow], specials: Specials, L: int, pad_id: int) -> Shard:
    C, pre = len(rows), len(specials.prefix)
    ids = np.full((C, L), pad_id, dtype=np.int64)
    spans = np.full((C, L, 2), -1, dtype=np.int32)
    length = np.zeros(C, dtype=np.int64)
    mined = np.zeros(C, dtype=np.int64)
    for c, row in enumerate(rows):
        seq = list(specials.prefix) + row.ids + list(specials.suffix)
        ids[c, : len(seq)] = seq
        spans[c, pre : pre + len(row.ids)] = np.asarray(row.spans, dtype=np.int32).reshape(-1, 2)
        length[c], mined[c] = len(seq), len(row.ids)
    return Shard(
        index=index, ids=ids, length=length, first=np.full(C, pre, dtype=np.int64), mined=mined,
        tok0=np.array([r.tok0 for r in rows], dtype=np.int64), ctx=np.array([r.ctx for r in rows], dtype=np.int64),
        doc_id=np.array([r.doc_id for r in rows], dtype=np.int64), spans=spans,
        next_id=np.array([r.next_id for r in rows], dtype=np.int64),
        token_text=np.array([t for r in rows for t in r.texts], dtype=object),
    )
