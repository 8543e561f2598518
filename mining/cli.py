"""The `mine` command. Every failure a user can cause prints one line and exits non-zero."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet()
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
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
    run.add_argument("--address", help="Ray cluster to join (auto | HOST:6379 | ray://HOST:10001); default: embedded")
    run.add_argument("--resume", action="store_true", help="finish an interrupted store, skipping completed shards")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
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

    ex = sub.add_parser("export", help="write example sets (JSONL/Parquet) for chosen neurons")
    ex.add_argument("store")
    ex.add_argument("--neuron", action="append", default=[], metavar="LAYER:NEURON", required=True)
    ex.add_argument("--hook", default="mlp.hook_post", help="hook site without the layer (default mlp.hook_post)")
    ex.add_argument("--k", type=int, default=10, help="top examples per neuron")
    ex.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    ex.add_argument("--out", required=True, help="output file")
    ex.set_defaults(func=cmd_export)

    ver = sub.add_parser("verify", help="check every store file against the manifest's checksums")
    ver.add_argument("store")
    ver.set_defaults(func=cmd_verify)

    demo = sub.add_parser("demo", help="run jobs/demo.yaml end to end and print a few answers")
    demo.add_argument("--store", default="runs/demo")
    demo.add_argument("--job", default=None, help="job spec (default: the bundled jobs/demo.yaml)")
    demo.add_argument("--fresh", action="store_true", help="re-mine even if the store is complete")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
    return p


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_job
    from .spec import load_spec, store_path

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    spec = load_spec(args.job, args.set)
    summary = run_job(spec, store_path(spec, args.store), address=args.address, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress)
    print(f"mined {summary.tokens:,} tokens in {summary.shards} shards ({summary.mined_shards} this run) "
          f"in {summary.seconds:.1f} s ({summary.tokens_per_s:,.0f} tok/s overall) -> {summary.store}")
    for name, rows in sorted(summary.tables.items()):
        print(f"  {name}: {rows:,} rows")
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
    from .export import export_examples

    neurons = []
    for item in args.neuron:
        try:
            layer, neuron = (int(x) for x in item.split(":"))
        except ValueError:
            raise UserError(f"--neuron {item!r}: expected LAYER:NEURON, e.g. 5:100") from None
        neurons.append((layer, neuron))
    n = export_examples(Path(args.store), args.hook, neurons, args.k, args.format, Path(args.out))
    print(f"wrote {n} examples to {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import Store

    store = Store(args.store)
    if not store.root.is_dir():
        raise UserError(f"{args.store}: no such store directory")
    problems = store.verify()
    if problems:
        for line in problems[:20]:
            print(line)
        raise UserError(f"{args.store}: {len(problems)} problem(s) found")
    print(f"{args.store}: every shard file matches the manifest")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.store), args.job, args.fresh, args.set)


def parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--param {item!r}: expected key=value")
        key, _, value = item.partition("=")
        params[key.strip()] = value
    return params


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
