"""The `mine` command. Every failure a user can cause prints one line and exits non-zero."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .errors import UserError
from .gc_pause import gc_paused


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet()
    code = _run(args)
    if argv is None and args.func in (cmd_verify, cmd_query, cmd_queries):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a `mine` process that only read the store without the interpreter's teardown. Arrow's and DuckDB's native
    thread pools are torn down there, and Arrow's can abort the process as it does (apache/arrow#34314, "terminate
    called without an active exception"): a suite run saw `mine verify` end with SIGABRT after its answer, under load.
    These commands start no Ray and leave no file open, so nothing at exit is theirs to finish."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: disk full, permissions, a vanished path
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on the device{where}; free space (or choose another --store / --out), "
                  "then finish with `mine run --resume`", file=sys.stderr)
        else:
            print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finish with `mine run --resume`", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mine", description="Mine a transformer's activations into a queryable store.")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="mine a job spec into a store")
    run.add_argument("job", help="job spec (YAML)")
    run.add_argument("--store", help="store directory (default: the spec's `store`, else runs/<name>)")
    run.add_argument("--address", help="Ray cluster to join (auto | HOST:6379 | ray://HOST:10001); default: an embedded "
                     "one of its own (RAY_ADDRESS is read only with auto)")
    run.add_argument("--resume", action="store_true", help="finish an interrupted store, skipping completed shards")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    run.add_argument("--allow-failed-shards", action="store_true",
                     help="exit 0 even if some shards failed after their retries (they are listed in the manifest)")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    q = sub.add_parser("query", help="run SQL, or a named query, over a store")
    q.add_argument("store")
    q.add_argument("sql", nargs="?", help="SQL text (omit with --named)")
    q.add_argument("--named", help="a named query (see `mine queries`)")
    q.add_argument("--param", action="append", default=[], metavar="K=V")
    q.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    q.add_argument("--out", help="write to this file instead of stdout")
    q.set_defaults(func=cmd_query)

    qs = sub.add_parser("queries", help="list the named queries")
    qs.set_defaults(func=cmd_queries)

    ex = sub.add_parser("export", help="example sets of chosen neurons: JSONL, Parquet, OpenAI neuron records, "
                                       "Neuronpedia, or a static HTML viewer (a diff store's: --format html)")
    ex.add_argument("store")
    pick = ex.add_argument_group("which neurons (any mix; at least one)")
    pick.add_argument("--neuron", action="append", default=[], metavar="LAYER:NEURON")
    pick.add_argument("--query", metavar="NAME", help="a named query whose rows have layer, neuron (and hook) columns")
    pick.add_argument("--param", action="append", default=[], metavar="K=V", help="a parameter of --query")
    pick.add_argument("--top", type=int, default=None, metavar="N",
                      help="the top N neurons by --by (a diff store: default 20 unless --neuron is given)")
    pick.add_argument("--by", default="kurtosis",
                      help="metric for --top: mean, std, skew, kurtosis, frac_active, min, max, abs_max (default "
                           "kurtosis); for a diff store mean_abs_diff, corr or overlap (default mean_abs_diff)")
    pick.add_argument("--order", default="desc", choices=["desc", "asc"], help="--top order (default desc)")
    pick.add_argument("--layer", type=int, default=-1, help="--top within one layer (default: all)")
    ex.add_argument("--hook", help="hook site without the layer (default mlp.hook_post, or the store's first hook "
                    "where it has none)")
    ex.add_argument("--format", default="jsonl", choices=["jsonl", "parquet", "openai", "neuronpedia", "html"],
                    help="jsonl/parquet: a file; openai, neuronpedia, html: a directory (default jsonl)")
    ex.add_argument("--out", required=True, help="output file (jsonl, parquet) or directory")
    ex.add_argument("--k", type=int, default=10, help="top contexts and bottom tokens per neuron (default 10)")
    ex.add_argument("--per-band", type=int, default=2, help="examples per quantile band, if mined (default 2)")
    ex.add_argument("--random", type=int, default=5, help="random contexts, shared by all neurons (default 5)")
    ex.add_argument("--seed", type=int, default=0, help="seed of the random contexts (default 0)")
    ex.add_argument("--sets", default="top,bottom,band,random", help="example sets to include (default all four)")
    ex.add_argument("--heads", type=int, default=20,
                    help="html: head pages for the top N heads by induction score (default 20; 0: none)")
    ex.add_argument("--actors", type=int, default=0,
                    help="replay the contexts on this many Ray actors (default 0: in this process)")
    ex.add_argument("--address", help="Ray cluster for --actors (default: an embedded local one)")
    ex.add_argument("--model-id", help="neuronpedia: the model id (default: from the store's model)")
    ex.add_argument("--source-set", default="mine", help="neuronpedia: the source-set name (default mine)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="the neuron viewer on 127.0.0.1, pages built on demand from the store")
    sv.add_argument("store")
    sv.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    sv.set_defaults(func=cmd_serve)

    _add_analyze(sub)

    ver = sub.add_parser("verify", help="check every store file against the manifest's checksums")
    ver.add_argument("store")
    ver.set_defaults(func=cmd_verify)

    demo = sub.add_parser("demo", help="run jobs/demo.yaml end to end and print a few answers")
    demo.add_argument("--store", default="runs/demo")
    demo.add_argument("--job", default=None, help="job spec (default: the bundled jobs/demo.yaml)")
    demo.add_argument("--fresh", action="store_true", help="re-mine even if the store is complete")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)

    from .bench import PARTS

    bench = sub.add_parser("bench", help="mining throughput next to the bare forward pass; store size, memory, "
                                          "query latency")
    bench.add_argument("--model", default="smollm2-135m", help="alias, HF id, local dir or .gguf (default smollm2-135m)")
    bench.add_argument("--tokens", type=int, default=4096, help="mined tokens per timed run (default 4096)")
    bench.add_argument("--batch-size", type=_int_or_auto, default=8,
                       help="contexts per forward pass, or auto (compute.batch_size: auto; default 8)")
    bench.add_argument("--context-length", type=int, default=128, help="tokens per context (default 128)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    bench.add_argument("--corpus", default="builtin:python-docs",
                       help="corpus source of the slice (default builtin:python-docs; builtin:python-stdlib is larger)")
    bench.add_argument("--repeats", type=int, default=2, help="rounds of every variant (default 2)")
    bench.add_argument("--interleave", default="auto", choices=["auto", "batch", "run"],
                       help="batch: each batch of each variant beside the forward's; run: whole runs; auto (default): "
                            "batch on the CPU, run on a GPU")
    bench.add_argument("--parts", default="all", help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    bench.add_argument("--memory-repeats", type=int, default=2,
                       help="fresh processes per size in the memory part (default 2); a size's peak is the largest")
    bench.add_argument("--memory-tokens", type=int, help="N of the memory part, which mines N and 10N tokens "
                                                         "(default: two full batches)")
    bench.add_argument("--memory-variant", default="token_table", choices=["mining", "dla", "token_table", "dense"],
                       help="what the memory part mines (default token_table: mining + DLA + token table)")
    bench.add_argument("--synthetic-store", help="directory for the duckdb part's synthetic store, reused across "
                                                 "runs (default: a temporary directory)")
    bench.add_argument("--synthetic-tokens", type=int, default=10_000_000, help="token rows of that store (default 10M)")
    bench.add_argument("--cold", action="store_true", help="time fresh miners (an actor's first shard) instead "
                                                           "of their steady state (top-k thresholds settled)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    bench.set_defaults(func=cmd_bench)

    address_help = ("Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS if http, "
                    "else http://127.0.0.1:8265)")
    sm = sub.add_parser("submit", help="run a job spec on a Ray cluster through the Jobs API")
    sm.add_argument("job", help="job spec (YAML)")
    sm.add_argument("--address", help=address_help)
    sm.add_argument("--store", help="absolute store path on storage every node shares (default: the spec's `store`)")
    sm.add_argument("--resume", action="store_true", help="finish an interrupted store, skipping completed shards")
    sm.add_argument("--overwrite", action="store_true", help="replace an existing store")
    sm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    sm.add_argument("--wait", action="store_true",
                    help="follow the logs until the job ends; non-zero exit if it failed")
    sm.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="status, logs, stop and list of submitted jobs")
    jsub = jobs.add_subparsers(metavar="ACTION", required=True)
    for action, text in (("status", "a job's status"), ("logs", "a job's output"), ("stop", "stop a running job")):
        a = jsub.add_parser(action, help=text)
        a.add_argument("job_id")
        a.add_argument("--address", help=address_help)
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
        a.set_defaults(func=cmd_jobs, action=action)
    ls = jsub.add_parser("list", help="every job the cluster knows")
    ls.add_argument("--address", help=address_help)
    ls.set_defaults(func=cmd_jobs, action="list", job_id=None)
    _add_finetune(sub)
    return p


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="save a briefly fine-tuned copy of a model (to diff against the original)")
    ft.add_argument("--model", default="smollm2-135m", help="alias, HF id, local dir or .gguf (default smollm2-135m)")
    ft.add_argument("--corpus", default="builtin:python-stdlib", help="corpus source (default: Python source code)")
    ft.add_argument("--out", required=True, help="new directory for the fine-tuned copy")
    ft.add_argument("--steps", type=int, default=20)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--batch-size", type=int, default=4)
    ft.add_argument("--context-length", type=int, default=128)
    ft.add_argument("--layers", default="all", help="blocks that train: all, 28,29 or 20-29 (the rest stay frozen)")
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    r = finetune(args.model, args.corpus, Path(args.out), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                 context_length=args.context_length, layers=args.layers)
    print(f"fine-tuned {args.model} on {r.tokens:,} tokens of {args.corpus} ({r.steps} steps, layers "
          f"{r.layers[0]}-{r.layers[-1] if len(r.layers) > 1 else r.layers[0]}): loss {r.loss_first:.3f} -> "
          f"{r.loss_last:.3f} in {r.seconds:.0f} s -> {r.out}")
    return 0


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from .spec import load_spec, store_path

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    spec = load_spec(args.job, args.set)  # before torch is imported: a bad spec fails in a fraction of a second
    with gc_paused():
        from .runner import run_job

    summary = run_job(spec, store_path(spec, args.store), address=args.address, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress,
                      allow_failed=args.allow_failed_shards)
    print(f"mined {summary.tokens:,} tokens in {summary.shards} shards ({summary.mined_shards} this run) "
          f"in {summary.seconds:.1f} s ({summary.tokens_per_s:,.0f} tok/s overall; "
          f"{summary.mining_tokens_per_s:,.0f} tok/s on {summary.actors} actor(s) once loaded"
          f"{f', batch {summary.batch_size}' if summary.batch_size else ''}) -> {summary.store}")
    for name, rows in sorted(summary.tables.items()):
        print(f"  {name}: {rows:,} rows")
    if summary.retried or summary.failed:
        print(f"  {summary.retried} shard attempt(s) retried; {len(summary.failed)} shard(s) failed"
              + "".join(f"\n    shard {m['shard']}: {m['error']}" for m in summary.failed))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .query import connect, run_named, run_sql, write_result

    if bool(args.sql) == bool(args.named):
        raise UserError("give either SQL text or --named NAME (see `mine queries`)")
    params = parse_params(args.param)
    con = connect(args.store)
    table = run_named(con, args.named, params) if args.named else run_sql(con, args.sql, params or None)
    write_result(table, args.format, Path(args.out) if args.out else None)
    return 0


def cmd_queries(args: argparse.Namespace) -> int:
    from .query import list_named

    for q in list_named():
        params = " ".join(p.name if p.default is None else f"[{p.name}={p.default}]" for p in q.params)
        print(f"{q.name:<22} {q.purpose}")
        if params:
            print(f"{'':<22}   params: {params}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .examples import SETS
    from .export import ExampleCounts, export

    neurons = [_layer_neuron(item) for item in args.neuron]
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    bad = [s for s in sets if s not in SETS]
    if bad or not sets:
        raise UserError(f"--sets {args.sets!r}: choose from {', '.join(SETS)}")
    for name in ("k", "per_band", "random", "top", "heads", "actors"):
        if (getattr(args, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 0")
    if args.param and not args.query:
        raise UserError("--param needs --query NAME")
    counts = ExampleCounts(k=args.k, per_band=args.per_band, random=args.random, seed=args.seed, sets=sets)
    selection = dict(hook=args.hook, explicit=neurons, query=args.query, params=parse_params(args.param),
                     top=args.top, by=args.by, order=args.order, layer=args.layer)
    print(export(args.store, args.format, Path(args.out), counts=counts, selection=selection,
                 model_id=args.model_id, source_set=args.source_set, heads=args.heads, actors=args.actors,
                 address=args.address))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .viewer.server import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be between 0 and 65535")
    return serve(args.store, args.port)


def _layer_neuron(item: str) -> tuple[int, int]:
    try:
        layer, neuron = (int(x) for x in item.split(":"))
    except ValueError:
        raise UserError(f"--neuron {item!r}: expected LAYER:NEURON, e.g. 5:100") from None
    return layer, neuron


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    an = sub.add_parser("analyze", help="analyses over the dense activations: regex, pca, cofire, offsets (tables in "
                        "the store)")
    an.add_argument("store")
    kinds = an.add_subparsers(dest="kind", metavar="KIND", required=True)
    hook_help = "dense hook: full name, glob or site (default: every dense hook)"

    rx = kinds.add_parser("regex", help="correlate each neuron with 'the token overlaps a match' -> regex_neurons")
    rx.add_argument("pattern", help="Python regular expression, matched in each document's text")
    rx.add_argument("--hook", help=hook_help)
    rx.add_argument("--name", help="label stored in the pattern column (default: the pattern itself)")

    pc = kinds.add_parser("pca", help="principal components -> pca_components, pca_examples, pca_loadings")
    pc.add_argument("--hook", help=hook_help)
    pc.add_argument("--components", type=int, help="components to keep (default 10, or fewer where a hook has fewer "
                    "neurons or sampled tokens)")
    pc.add_argument("--examples", type=int, default=20, help="top tokens per component and sign (default 20)")
    pc.add_argument("--loadings", type=int, default=20, help="top neurons per component by |loading| (default 20)")

    cf = kinds.add_parser("cofire", help="neuron pairs and groups that fire together -> cofiring, cofire_groups")
    cf.add_argument("--hook", help=hook_help)
    cf.add_argument("--threshold", type=float, default=0.5, help="Jaccard joining neurons into groups (default 0.5)")
    cf.add_argument("--pairs", type=int, default=100, help="top pairs kept per layer (default 100)")
    cf.add_argument("--quantile", type=float, default=0.9,
                    help="a neuron fires above 0 and above this quantile of its own sample (default 0.9)")
    cf.add_argument("--min-both", type=int, default=5, help="least tokens a pair must fire on together (default 5)")

    off = kinds.add_parser("offsets", help="attention patterns by distance (attn.hook_pattern) -> pattern_offsets")
    off.add_argument("--hook", help=hook_help)
    off.add_argument("--max-offset", type=int, default=64, help="farthest distance back kept (default 64)")
    an.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import analyze

    if args.kind == "regex":
        lines = analyze.analyze_regex(args.store, args.pattern, args.hook, args.name)
    elif args.kind == "pca":
        lines = analyze.analyze_pca(args.store, args.hook, args.components, args.examples, args.loadings)
    elif args.kind == "offsets":
        lines = analyze.analyze_offsets(args.store, args.hook, args.max_offset)
    else:
        lines = analyze.analyze_cofire(args.store, args.hook, args.threshold, args.pairs, args.quantile,
                                       args.min_both)
    print("\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import Store

    store = Store(args.store)
    if not store.root.is_dir():
        raise UserError(f"{args.store}: no such store directory")
    if not store.complete:
        raise UserError(f"{args.store}: no manifest.parquet: the store is incomplete; finish it with `mine run --resume`")
    problems = store.verify()
    if problems:
        for line in problems[:20]:
            print(line)
        raise UserError(f"{args.store}: {len(problems)} problem(s) found")
    print(f"{args.store}: every file matches the manifest's checksums")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with gc_paused():
        from .demo import run_demo

    return run_demo(Path(args.store), args.job, args.fresh, args.set)


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import BenchConfig, format_report, parse_parts, run_bench

    cfg = BenchConfig(model=args.model, tokens=args.tokens, batch_size=args.batch_size,
                      context_length=args.context_length, dtype=args.dtype, device=args.device, threads=args.threads,
                      corpus=args.corpus,
                      repeats=args.repeats, interleave=args.interleave, parts=parse_parts(args.parts),
                      memory_tokens=args.memory_tokens,
                      memory_repeats=args.memory_repeats,
                      memory_variant=args.memory_variant,
                      synthetic_store=args.synthetic_store, synthetic_tokens=args.synthetic_tokens,
                      settle=not args.cold)
    result = run_bench(cfg)
    print(json.dumps(result) if args.json else format_report(result), flush=True)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import check_finished, follow, submit

    client, url, job_id = submit(args.job, args.address, args.set, args.store, resume=args.resume,
                                 overwrite=args.overwrite)
    print(job_id, flush=True)
    if not args.wait:
        print(f"follow it: mine jobs logs {job_id} --address {url} --follow", file=sys.stderr)
        return 0
    try:
        status = follow(client, url, job_id)
    except KeyboardInterrupt:
        raise UserError(f"stopped following; the job runs on: mine jobs stop {job_id} --address {url}") from None
    check_finished(client, url, job_id, status)
    print(f"job {job_id} {status}", file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from . import submit as sj

    client, url = sj.connect(args.address)
    if args.action == "list":
        for info in sorted(sj._call(url, "*", client.list_jobs), key=lambda i: i.start_time or 0):
            print(sj.describe(info))
    elif args.action == "status":
        info = sj._call(url, args.job_id, client.get_job_info, args.job_id)
        print(f"{args.job_id} {info.status.value}" + (f": {sj._first_line(info.message)}" if info.message else ""))
    elif args.action == "logs" and args.follow:
        try:
            sj.follow(client, url, args.job_id)
        except KeyboardInterrupt:
            return 130
    elif args.action == "logs":
        sys.stdout.write(sj._call(url, args.job_id, client.get_job_logs, args.job_id))
    else:
        status = sj.stop(client, url, args.job_id)
        print(f"{args.job_id} {status}")
    return 0


def parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--param {item!r}: expected key=value")
        key, _, value = item.partition("=")
        params[key.strip()] = value
    return params


def _quiet() -> None:
    """No progress bars or advisory warnings from the libraries: commands print one line on error. Set
    through the environment (read when transformers is imported), so that a command that never needs
    torch or transformers - a malformed job file, a query - does not pay seconds importing them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the hub's
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit(main())
