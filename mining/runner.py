"""Run a job: validate, plan shards, mine them on Ray actors, merge, write the store.

The driver plans (tokenizes the corpus into shards), hands one shard at a time to whichever
actor is free (a dynamic queue, not a static split), and folds their states in shard order as
they complete (merge.RunningFold), so that only the last shards' merge follows the mining.
Actors load the model once, write their shard's files straight into the store and return
only a small marker dict — no tensors travel through the object store.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import __version__
from .architectures import text_config
from .corpus import check_source, iter_documents
from .engine import frequent_tokens
from .errors import UserError
from .gc_pause import gc_paused
from .merge import RunningFold, merge_into_tables, write_manifest
from .sae import SUFFIX, load_saes, sae_provenance
from .models import check_weight_files, load_config, load_tokenizer, resolve_source
from .shards import Shard, build_shards, iter_contexts, special_tokens
from .spec import CPU_SHARD_TOKENS, GPU_SHARD_TOKENS, JobSpec
from .store import Store


@dataclass
class RunSummary:
    store: Path
    tokens: int
    shards: int
    mined_shards: int
    seconds: float
    tables: dict[str, int]
    retried: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    mined_tokens: int = 0
    mining_seconds: float = 0.0
    actors: int = 0
    batch_size: int | None = None
    """Contexts per forward pass (what `auto` chose, when it was asked for)."""

    @property
    def mining_tokens_per_s(self) -> float:
        """Throughput once the actors hold their model: what scales with actors and GPUs."""
        return self.mined_tokens / self.mining_seconds if self.mining_seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


STATE_MEMORY_FRACTION = 0.25
"""A job's merged statistics may take this much of the driver machine's memory: the driver holds two while it folds a
shard into the merge, and an actor on the same machine one of its own."""


def check_state_memory(spec: JobSpec, points: list) -> None:
    """Refuse, in one line, a job whose statistics would not fit the driver's memory (an attention pattern is heads x
    context_length wide a layer; a large model's MLPs tens of thousands)."""
    from .diff import machine_memory
    from .engine import state_bytes_per_feature

    features = sum(p.width for p in points)
    need = features * state_bytes_per_feature(spec)
    memory = machine_memory()
    if need > STATE_MEMORY_FRACTION * memory:
        wide = max(points, key=lambda p: p.width)
        raise UserError(f"hooks: the job's statistics take about {need / 2**30:.1f} GiB ({features:,} features, "
                        f"{wide.name} alone {wide.width:,} wide), held twice while the driver merges: more than a "
                        f"quarter of this machine's {memory / 2**30:.0f} GiB; hook fewer layers or sites"
                        + (", or shorten corpus.context_length" if wide.n_ctx else "")
                        + (", or turn stats.histogram off" if spec.stats.histogram else ""))


def validate(spec: JobSpec) -> Any:
    """Everything that can be checked without weights: corpus, model files, hook names, lengths."""
    check_source(spec.corpus)
    resolve_source(spec.model)
    check_weight_files(spec.model)
    config = load_config(spec.model)
    text = text_config(config)
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if limit and spec.corpus.context_length > limit:
        raise UserError(f"corpus.context_length: {spec.corpus.context_length} exceeds the model's maximum of {limit}")
    meta = meta_model(config)
    from .hooks import resolve_hooks

    n_ctx = spec.corpus.context_length
    saes = load_saes(spec.saes)  # their configs and weight files' headers
    # a diff job may have no hooks (token by token)
    points = resolve_hooks(meta, spec.hooks, n_ctx, saes) if spec.hooks else []
    dense = resolve_hooks(meta, spec.dense.hooks, n_ctx, saes) if spec.dense.hooks else []
    read = {p.name.removesuffix(SUFFIX) for p in points + dense if p.sae}
    unread = sorted(set(saes) - read)
    if unread:
        raise UserError(f"saes.{unread[0]}: no hook reads this SAE; add {unread[0]}{SUFFIX} to hooks, or remove it")
    if spec.is_diff:
        validate_diff(spec, meta, saes)
    elif points:
        check_state_memory(spec, points)
    from .models import ENCODER_TYPES

    if config.model_type in ENCODER_TYPES:
        for key, why in CAUSAL_ONLY.items():
            if getattr(spec.stats, key):
                raise UserError(f"stats.{key}: needs a causal LM ({why}); {spec.model.id} is an encoder "
                                f"({config.model_type}): turn it off for this model")
    if spec.stats.gate_cases:
        from .engine import gate_points

        if not gate_points(meta, points):
            raise UserError("stats.gate_cases: no hooked blocks.*.mlp.hook_post of a gated MLP (SwiGLU/GeGLU) in "
                            "this job; turn it off for this model")
    reading = [key for key in ("dla", "logit_lens") if getattr(spec.stats, key)]  # neurons' output weights, decoders
    if reading and points and not spec.is_diff:
        from .analyses.logit_lens import has_lens

        if not any(map(has_lens, points)):
            raise UserError(f"stats.{reading[0]}: it reads blocks.*.mlp.hook_post neurons (or an SAE's latents whose "
                            "decoder writes the stream) and this job hooks none; hook them or turn it off")
        for p in points:
            if p.sae and has_lens(p) and not p.sae.has_decoder:
                raise UserError(f"saes.{p.sae.hook}: {p.sae.folder} has no W_dec of {p.sae.d_sae} rows, and "
                                f"stats.{reading[0]} reads each latent's decoder row; give the SAE's decoder, or "
                                f"turn stats.{reading[0]} off")
    return config


CAUSAL_ONLY = {"dla": "it attributes the logit of the actual next token", "head_ablation": "it scores the next-token loss"}
"""Stats an encoder cannot give, with why (the token table's log-probs are NULL for one instead, its rows still useful)."""

DIFF_UNSUPPORTED = ("quantile_samples", "gate_cases", "polysemanticity", "head_ablation", "heads",
                    "logit_lens")


def validate_diff(spec: JobSpec, meta_a: Any, saes: dict[str, Any]) -> None:
    """A diff job: B's files exist, both tokenize alike, the hooks exist in B (saes: the job's, read on both);
    per-model analyses refused."""
    on = [key for key in DIFF_UNSUPPORTED if getattr(spec.stats, key)]
    if on:
        raise UserError(f"stats.{on[0]}: not available in a diff job (models: a, b); mine each model on its own for it")
    if spec.dense.hooks:
        raise UserError("dense.hooks: not available in a diff job; mine each model on its own for dense activations")
    b = spec.models["b"]
    resolve_source(b)
    check_weight_files(b)
    from .diff import same_tokenizer
    from .hooks import resolve_hooks

    if not same_tokenizer(load_tokenizer(spec.models["a"]), load_tokenizer(b)):
        raise UserError(f"models.a ({spec.models['a'].id}) and models.b ({b.id}) tokenize differently; "
                        "a diff compares the same tokens, so both need the same tokenizer")
    if not spec.hooks:
        paired = [key for key in ("dla", "neuron_match") if getattr(spec.stats, key)]
        if paired:
            raise UserError(f"stats.{paired[0]}: compares the two models neuron by neuron, and this diff job has no "
                            "hooks (it compares them token by token); give hooks, or turn it off")
        return
    from .diff import check_cross_memory, check_same_structure, paired_points, structure_difference
    from .hooks import n_layers

    points_a = resolve_hooks(meta_a, spec.hooks, spec.corpus.context_length, saes)
    meta_b, n_a = meta_model(load_config(b)), n_layers(meta_a)
    problem = structure_difference(points_a, n_a, meta_b, spec.hooks)
    cross_size = problem is not None
    if cross_size and saes:
        raise UserError(f"saes: {problem}; a diff reads both models' activations with the same SAEs, which needs "
                        "models of the same structure where they read")
    if cross_size and not spec.stats.neuron_match:
        check_same_structure(points_a, n_a, meta_b, spec.hooks)
    if cross_size and spec.stats.dla:  # models of other sizes: only neuron_match pairs them, by correlation
        raise UserError("stats.dla: compares the two models neuron by neuron, and models.a and models.b differ "
                        "in size (only neuron_match pairs their neurons, by correlation); turn it off")
    pairs = paired_points(points_a, n_a, meta_b, cross_size, saes)
    if spec.stats.neuron_match:
        check_cross_memory(pairs)


def meta_model(config: Any) -> Any:
    """The module tree without weights (instant), to resolve hook names before loading anything."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from .models import ENCODER_TYPES

    auto = AutoModel if config.model_type in ENCODER_TYPES else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def plan(spec: JobSpec, tokenizer: Any) -> tuple[list[Shard], pa.Table]:
    source = resolve_source(spec.model)
    specials = special_tokens(tokenizer, spec.corpus.bos, source.bos)
    docs: list[Any] = []
    doc_tokens: dict[int, int] = {}

    def remember(iterator):
        for doc in iterator:
            docs.append(doc)
            yield doc

    contexts = iter_contexts(remember(iter_documents(spec.corpus)), tokenizer, spec.corpus.context_length,
                             spec.corpus.max_tokens, specials, doc_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # run_job resolves an `auto` shard size by the actors' device first; in-process callers (bench, finetune) get
    # the CPU size
    shard_tokens = spec.compute.fixed_shard_tokens or CPU_SHARD_TOKENS
    shards = build_shards(contexts, specials, spec.corpus.context_length, shard_tokens, pad)
    if not shards:
        raise UserError(f"corpus.source: {spec.corpus.source!r} produced no tokens (empty corpus?)")
    docs = [d for d in docs if d.doc_id in doc_tokens]
    table = pa.table({
        "doc_id": pa.array([d.doc_id for d in docs], pa.int64()),
        "source": [d.source for d in docs],
        "path": [d.path for d in docs],
        "n_chars": pa.array([len(d.text) for d in docs], pa.int64()),
        "n_tokens": pa.array([doc_tokens[d.doc_id] for d in docs], pa.int64()),
        "text": [d.text for d in docs],
    })
    return shards, table


def provenance(spec: JobSpec, tokenizer: Any, shards: list[Shard]) -> dict[str, Any]:
    from .models import weights_hash

    source = resolve_source(spec.model)
    packages = {}
    for name in ("torch", "transformers", "ray", "duckdb", "pyarrow", "zarr", "datasets", "tokenizers"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "mining_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": packages,
        "model": {"id": spec.model.id, "path": source.path, "gguf_file": source.gguf_file,
                  "revision": source.revision, "weights_sha256": weights_hash(source)},
        "tokenizer": {"class": type(tokenizer).__name__, "name": getattr(tokenizer, "name_or_path", None),
                      "vocab_size": len(tokenizer)},
        "saes": sae_provenance(spec.saes),
        "corpus": {"source": spec.corpus.source, "context_length": spec.corpus.context_length,
                   "max_tokens": spec.corpus.max_tokens, "bos": spec.corpus.bos},
        "shards": [{"shard": s.index, "first_tok": s.first_tok, "tokens": s.n_tokens, "contexts": len(s.ids),
                    "first_ctx": int(s.ctx[0])} for s in shards],
    }


def run_job(spec: JobSpec, store_dir: Path, *, address: str | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, allow_failed: bool = False) -> RunSummary:
    start = time.perf_counter()
    store = Store(store_dir)
    spec = recorded_compute(spec, store, resume)
    store.prepare(spec.to_dict(), resume=resume, overwrite=overwrite)  # refuses before anything is loaded
    if address:
        from .ray_pool import check_address

        check_address(address)
    with gc_paused():  # transformers' imports, the model's module tree, the tokenizer
        validate(spec)
        tokenizer = load_tokenizer(spec.model)
    if spec.compute.fixed_shard_tokens is None:
        from .ray_pool import actors_on_gpus

        spec = spec.with_compute(shard_tokens=GPU_SHARD_TOKENS if actors_on_gpus(spec, address) else CPU_SHARD_TOKENS)
    job = spec.to_dict()
    shards, docs = plan(spec, tokenizer)
    store.begin(job, provenance(spec, tokenizer, shards), resume=resume)
    if not (store.root / "docs.parquet").exists() or not resume:
        store.write_docs(docs)
    todo = [s for s in shards if not (resume and store.shard_done(s.index))]
    from .ray_pool import mine_on_ray

    merged: dict[str, Any] = {}
    wanted = model_tables(spec, store, resume)
    todo_index = {s.index for s in todo}
    fold = RunningFold(store, spec, done=[s.index for s in shards if s.index not in todo_index])

    def after_shards() -> dict[str, Any]:
        merged["tables"], merged["failed"] = merge_into_tables(store, spec, len(shards), fold)
        return model_table_inputs(spec, store, shards, wanted)

    token_groups = frequent_tokens(shards, spec.stats.token_groups) if spec.stats.polysemanticity else None
    try:
        pool = mine_on_ray(spec, store, todo, total_tokens=sum(s.n_tokens for s in shards),
                           done_tokens=sum(s.n_tokens for s in shards) - sum(s.n_tokens for s in todo),
                           address=address, progress=progress, model_tables=wanted, token_groups=token_groups,
                           after_shards=after_shards, on_shard=fold.add, on_batch_size=store.record_batch_size)
        if "tables" not in merged:  # nothing left to mine and no model table to write: still merge
            after_shards()
    finally:
        fold.close()
    write_manifest(store, len(shards))
    tables, failed = merged["tables"], merged["failed"]
    summary = RunSummary(store.root, sum(s.n_tokens for s in shards), len(shards), len(todo),
                         time.perf_counter() - start, tables, pool.retried, failed,
                         sum(s.n_tokens for s in todo), pool.seconds, pool.actors,
                         pool.batch_size or spec.compute.fixed_batch_size)
    if failed and not allow_failed:
        reasons = "; ".join(f"shard {m['shard']}: {m['error']}" for m in failed[:3])
        raise UserError(f"{len(failed)} of {len(shards)} shards failed ({reasons}); the store holds the rest and "
                        "the manifest lists them: retry with `mine run --resume`, or pass --allow-failed-shards")
    return summary


def recorded_compute(spec: JobSpec, store: Store, resume: bool) -> JobSpec:
    """`--resume` of an `auto` batch size or shard size: the number the store's shards were mined with."""
    if not resume:
        return spec
    try:
        recorded = (store.recorded_job() or {}).get("compute", {})
    except Exception:  # noqa: BLE001 - not a store, or an unreadable one: prepare() says which
        return spec
    values = {key: recorded[key] for key in ("batch_size", "shard_tokens")
              if getattr(spec.compute, key) == "auto" and isinstance(recorded.get(key), int) and recorded[key] > 0}
    return spec.with_compute(**values) if values else spec


def model_tables(spec: JobSpec, store: Store, resume: bool) -> list[str]:
    """The model-level tables this job asks for that the store does not hold yet."""
    s = spec.stats
    wanted = [name for name, on in (("logit_lens", s.logit_lens), ("heads", s.heads),
                                    ("neuron_coherence", s.polysemanticity), ("head_ablation", s.head_ablation),
                                    ("weight_diff", spec.is_diff)) if on]
    return [name for name in wanted if not (resume and store.exists(f"{name}.parquet"))]


def model_table_inputs(spec: JobSpec, store: Store, shards: list[Shard], names: list[str]) -> dict[str, Any]:
    """What the actors need for the model tables, gathered on the driver once the shards are merged."""
    from .model_tables import ablation_contexts

    import pyarrow.compute as pc

    inputs: dict[str, Any] = {"corpus_ids": sample_contexts(shards)}
    if not ({"neuron_coherence", "head_ablation"} & set(names)):
        return inputs
    contexts = store.read_table("top_contexts").select(["hook", "layer", "neuron", "tok"])
    if "neuron_coherence" in names:
        token_id = token_ids_by_tok(shards)
        inputs["peaks"] = pa.table({**{c: contexts[c] for c in ("hook", "layer", "neuron")},
                                    "token_id": token_id[contexts["tok"].to_numpy()]})
    if "head_ablation" in names:
        inputs["ablation_ids"] = ablation_contexts(shards, spec.stats.head_ablation_tokens)
        inputs["ablation_layers"] = sorted(int(v) for v in pc.unique(contexts["layer"]).to_pylist() if v >= 0)
    return inputs


def token_ids_by_tok(shards: list[Shard]) -> Any:
    """(total tokens,) int32: the token id of every global token index."""
    import numpy as np

    out = np.full(sum(s.n_tokens for s in shards), -1, dtype=np.int32)
    for s in shards:
        grid = s.tok_grid()
        inside = grid >= 0
        out[grid[inside]] = s.ids[:, :grid.shape[1]][inside]
    return out


def sample_contexts(shards: list[Shard], n: int = 8) -> Any:
    """A few full-length contexts of the first shard (real text for attention sink and entropy)."""
    import numpy as np

    first = shards[0]
    full = first.length == first.length.max()
    return np.ascontiguousarray(first.ids[full][:n])


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
