"""Replay: re-run a store's model over chosen contexts to get every token's activation.

The store keeps per-neuron peaks, not whole activation tensors (46k neurons x every token would
be ~100x the store), so example sets and the viewer recompute the per-token values of just the
contexts they show. Contexts are rebuilt exactly as the miner built them (the tokenizer's special
prefix/suffix, right padding with an attention mask), batched, and the forward stops after the
deepest layer asked for. Cost: one forward pass per context up to that layer (SmolLM2-135M on
2 CPU cores: ~300 tokens/s at full depth, ~10x that for layer 3 of 30).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
import yaml

from .errors import UserError
from .hooks import capture, resolve_hooks
from .models import LoadedModel, load_model, resolve_source
from .sae import load_saes
from .shards import special_tokens
from .spec import spec_from_dict


@dataclass(frozen=True)
class Context:
    """One mined context: its token rows in position order."""

    ctx: int
    tok: tuple[int, ...]
    pos: tuple[int, ...]
    token_id: tuple[int, ...]
    token: tuple[str, ...]
    """Each token's text as shown: its span, after any of the document's text between it and the previous token that
    no span covers (WordPiece leaves spaces and newlines out of its spans; byte-level BPE's tile the text, so there
    it is the token table's `token`). Joined, they are the context's text."""
    doc_id: int
    char_start: tuple[int, ...]
    char_end: tuple[int, ...]

    @property
    def span(self) -> tuple[int, int]:
        """Character span of the whole context in its document."""
        return min(self.char_start), max(self.char_end)


def load_contexts(root: Path, ctxs: Iterable[int]) -> dict[int, Context]:
    """The token rows of each context, read from the store's token table."""
    wanted = sorted(set(int(c) for c in ctxs))
    if not wanted:
        return {}
    table = ds.dataset(root / "tokens", format="parquet").to_table(
        columns=["ctx", "tok", "pos", "token_id", "token", "doc_id", "char_start", "char_end"],
        filter=pc.field("ctx").isin(wanted)).sort_by([("ctx", "ascending"), ("pos", "ascending")])
    cols = table.to_pydict()
    rows: dict[int, dict[str, list]] = {}
    for i, ctx in enumerate(cols["ctx"]):
        r = rows.setdefault(ctx, {k: [] for k in cols})
        for k in cols:
            r[k].append(cols[k][i])
    missing = set(wanted) - set(rows)
    if missing:
        raise UserError(f"{root}: contexts {sorted(missing)[:5]} are not in the token table; was it mined "
                        "with stats.token_table: false?")
    gaps = {ctx: [i for i in range(1, len(r["pos"])) if r["char_start"][i] > r["char_end"][i - 1]]
            for ctx, r in rows.items()}
    texts = _doc_texts(root, {rows[ctx]["doc_id"][0] for ctx, at in gaps.items() if at})
    for ctx, at in gaps.items():
        r = rows[ctx]
        for i in at:
            r["token"][i] = texts[r["doc_id"][0]][r["char_end"][i - 1]:r["char_start"][i]] + r["token"][i]
    return {ctx: Context(ctx, tuple(r["tok"]), tuple(r["pos"]), tuple(r["token_id"]), tuple(r["token"]),
                         r["doc_id"][0], tuple(r["char_start"]), tuple(r["char_end"]))
            for ctx, r in rows.items()}


def _doc_texts(root: Path, doc_ids: set[int]) -> dict[int, str]:
    """The text of these documents (docs.parquet's row groups are small, so only theirs are read)."""
    if not doc_ids:
        return {}
    table = ds.dataset(root / "docs.parquet", format="parquet").to_table(
        columns=["doc_id", "text"], filter=pc.field("doc_id").isin(sorted(doc_ids)))
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))


class _Stop(Exception):
    """Raised from the deepest hook: nothing after it is needed."""


class Replayer:
    """The store's model, loaded once, replaying contexts; results are cached per (site, layer, ctx)."""

    def __init__(self, root: Path, batch_size: int = 8, cache_entries: int = 256, job: dict | None = None):
        self.root = Path(root)
        self.spec = spec_from_dict(job if job is not None else yaml.safe_load((self.root / "job.yaml").read_text()))
        self.batch_size = batch_size
        self._loaded: LoadedModel | None = None
        self._cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._patterns: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        self._cache_size = cache_entries  # one (T, width) array each: ~0.8 MB for 128 x 1536

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.spec.model)
            self._saes = load_saes(self.spec.saes)  # once: each keeps its encoder's tensors after the first batch
            self._specials = special_tokens(self._loaded.tokenizer, self.spec.corpus.bos,
                                            resolve_source(self.spec.model).bos)
        return self._loaded

    @property
    def specials(self):
        """The prefix/suffix the miner gave every context (computed once: it builds the vocabulary dict)."""
        _ = self.loaded
        return self._specials

    def activations(self, site: str, layers: Sequence[int], contexts: dict[int, Context],
                    columns: dict[int, list[int]] | None = None) -> dict[tuple[int, int], np.ndarray]:
        """(layer, ctx) -> (n_tokens, width) float32 activations of `site` (e.g. mlp.hook_post); with
        `columns` (layer -> neuron indices) only those columns, so many contexts fit in memory."""
        layers = sorted(set(layers))

        def keep(layer: int, x: np.ndarray) -> np.ndarray:
            return x if columns is None else x[:, columns[layer]]

        out: dict[tuple[int, int], np.ndarray] = {}
        todo = []
        for c in contexts.values():
            hits = [self._cache.get((site, layer, c.ctx)) for layer in layers]
            if any(h is None for h in hits):
                todo.append(c)
                continue
            for layer, h in zip(layers, hits):
                out[(layer, c.ctx)] = keep(layer, h)
                self._cache.move_to_end((site, layer, c.ctx))
        for lo in range(0, len(todo), self.batch_size):
            for (layer, ctx), x in self._run(site, layers, todo[lo : lo + self.batch_size]).items():
                out[(layer, ctx)] = keep(layer, x)
                self._cache[(site, layer, ctx)] = x
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.inference_mode()
    def _run(self, site: str, layers: list[int], batch: list[Context]) -> dict[tuple[int, int], np.ndarray]:
        loaded = self.loaded
        prefix, suffix = list(self.specials.prefix), list(self.specials.suffix)
        for c in batch:
            if c.pos and c.pos[0] != len(prefix):
                raise UserError(f"{self.root}: context {c.ctx} does not start where the tokenizer's specials end; "
                                "was it mined with another tokenizer?")
        rows = [prefix + list(c.token_id) + suffix for c in batch]
        # every batch padded to the context length: a context's numbers do not depend on its batch
        T = max(max(len(r) for r in rows), self.spec.corpus.context_length)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        attention = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        names = [f"blocks.{layer}.{site}" for layer in layers]
        points = resolve_hooks(loaded.model, names, self.spec.corpus.context_length, self._saes)
        deepest = max(layers)
        seen: dict[int, torch.Tensor] = {}

        def grab(point, x: torch.Tensor) -> None:
            seen[point.layer] = x.float().cpu()
            if point.layer == deepest and len(seen) == len(layers):
                raise _Stop

        try:
            with capture(loaded.model, points, grab):
                loaded.model(input_ids=ids.to(loaded.device), attention_mask=attention.to(loaded.device))
        except _Stop:
            pass
        first = len(prefix)
        return {(layer, c.ctx): x[i, first : first + len(c.token_id)].numpy().astype(np.float32)
                for layer, x in seen.items() for i, c in enumerate(batch)}

    def attention(self, layer: int, context: Context, max_tokens: int = 64) -> tuple[np.ndarray, int]:
        """Attention patterns (heads, q, k) of `layer` over the context's first `max_tokens` tokens (plus
        the specials before them, whose count is returned). All layers come from one forward; kept per context."""
        from .analyses.heads import attention_patterns

        key = (context.ctx, max_tokens)
        if key not in self._patterns:
            ids = list(self.specials.prefix) + list(context.token_id[:max_tokens])
            patterns = attention_patterns(self.loaded.model, torch.tensor([ids]))[:, 0].cpu().numpy()
            self._patterns[key] = (patterns, len(self.specials.prefix))
        patterns, n_prefix = self._patterns[key]
        return patterns[layer], n_prefix


class ReplayActor:
    """A Replayer in a Ray actor (wrapped with ray.remote by RayReplayer)."""

    def __init__(self, root: str, job: dict, threads: int):
        torch.set_num_threads(threads)
        from .models import quiet_transformers

        quiet_transformers()
        self.replayer = Replayer(Path(root), job=job)

    def activations(self, site: str, layers: list[int], contexts: dict[int, Context],
                    columns: dict[int, list[int]] | None) -> dict[tuple[int, int], np.ndarray]:
        return self.replayer.activations(site, layers, contexts, columns)

    def attention(self, layer: int, context: Context, max_tokens: int) -> tuple[np.ndarray, int]:
        return self.replayer.attention(layer, context, max_tokens)


class RayReplayer:
    """The Replayer's interface with the contexts split across Ray actors, one model each (an embedded
    local cluster, or the cluster at `address`: one GPU per actor when the cluster has them)."""

    def __init__(self, root: Path, actors: int, address: str | None = None):
        import ray

        from .ray_pool import start_ray

        self.root = Path(root)
        job = yaml.safe_load((self.root / "job.yaml").read_text())
        self.spec = spec_from_dict(job)
        start_ray(address, num_cpus=None if address else actors)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= actors else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(ReplayActor)
        self.actors = [remote.remote(str(self.root.resolve()), job, 1) for _ in range(actors)]

    def activations(self, site: str, layers: Sequence[int], contexts: dict[int, Context],
                    columns: dict[int, list[int]] | None = None) -> dict[tuple[int, int], np.ndarray]:
        import ray

        order = sorted(contexts)
        size = -(-len(order) // len(self.actors)) if order else 0
        parts = [order[i : i + size] for i in range(0, len(order), size)] if size else []
        futures = [actor.activations.remote(site, list(layers), {c: contexts[c] for c in part}, columns)
                   for actor, part in zip(self.actors, parts)]
        out: dict[tuple[int, int], np.ndarray] = {}
        for part in ray.get(futures):
            out.update(part)
        return out

    def attention(self, layer: int, context: Context, max_tokens: int = 64) -> tuple[np.ndarray, int]:
        import ray

        return ray.get(self.actors[0].attention.remote(layer, context, max_tokens))

    def close(self) -> None:
        """Free the actors' CPUs/GPUs (the cluster itself stays up for whoever started it)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
