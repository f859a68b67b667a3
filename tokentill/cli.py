"""`tokentill`: the command line. Each subcommand builds its settings and calls one factory."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tokentill.settings import Settings


def _settings(args: argparse.Namespace, names: Sequence[str]) -> Settings:
    given: dict[str, Any] = {
        n: getattr(args, n) for n in names if getattr(args, n, None) is not None
    }
    return Settings(**given)


def _private_files() -> None:
    """Files the service makes (the warehouse, its WAL, the journal) are its owner's only."""
    os.umask(0o077)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokentill.app import create_app
    from tokentill.server import serve
    from tokentill.warehouse.db import WarehouseBusyError, open_warehouse
    from tokentill.warehouse.prices import PriceFileError, load_price_file

    settings = _settings(args, ("db", "upstream", "host", "port", "prices_file", "role"))
    _private_files()
    try:
        # Fail before binding the port if another process holds the warehouse, or if the
        # prices file cannot be used. (A lake has no owner: many processes share it.)
        if settings.lake_catalog is None:
            open_warehouse(settings.db).close()
        if settings.prices_file is not None:
            load_price_file(settings.prices_file)
        app = create_app(settings)
        ok = serve(
            app,
            settings.host,
            settings.port,
            graceful=settings.shutdown_grace,
            header_timeout=settings.header_timeout,
            max_connections=settings.max_connections,
        )
    except (WarehouseBusyError, PriceFileError) as exc:
        print(f"tokentill: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _cmd_rollup(args: argparse.Namespace) -> int:
    """Run the rollup once: here if the warehouse is free, else by the running server."""
    import json

    import httpx

    from tokentill.warehouse.db import WarehouseBusyError, open_warehouse
    from tokentill.warehouse.jobs import RollupConfig, RollupJob
    from tokentill.warehouse.prices import seed_published

    settings = _settings(args, ("db", "host", "port"))
    if settings.lake_catalog is not None:
        print(
            "tokentill: on a lake the active worker runs the rollups, every "
            f"{settings.rollup_interval:g} s (docs/cluster.md); nothing run here",
            file=sys.stderr,
        )
        return 2
    try:
        conn = open_warehouse(settings.db)
    except WarehouseBusyError:
        url = f"http://{settings.host}:{settings.port}/api/jobs/rollup/run"
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        print(f"tokentill: {settings.db} is held by the running server; asking it at {url}")
        try:
            answer = httpx.post(
                url,
                params={"full": str(args.full).lower()},
                headers={"Authorization": f"Bearer {token}"} if token else {},
                timeout=None,
            )
        except httpx.HTTPError as exc:
            print(f"tokentill: could not reach the server: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(answer.json(), indent=2))
        return 0 if answer.status_code == 200 and answer.json().get("error") is None else 1
    try:
        seed_published(conn)
        job = RollupJob(
            conn.cursor,
            RollupConfig(tag_keys=settings.rollup_tag_keys, image_model=settings.image_gen_model),
        )
        result = job.run(full=args.full)
    finally:
        conn.close()
    print(
        f"rollup ({result.mode}): {result.days} days, {result.rows_in} events in, "
        f"{result.rows_out} rows out, {result.seconds:.2f} s"
        + (f"; FAILED: {result.error}" if result.error else "")
    )
    return 1 if result.error else 0


def _cmd_export_focus(args: argparse.Namespace) -> int:
    """The FOCUS export (api/exports.py) into a file: read here if the warehouse file is
    free, else asked of the running server (which holds it, or serves the lake's api)."""
    import httpx

    from tokentill.api.finance import csv_chunks, parquet_chunks
    from tokentill.warehouse.db import WarehouseBusyError, open_warehouse
    from tokentill.warehouse.focus import read_focus
    from tokentill.warehouse.prices import seed_published

    settings = _settings(args, ("db", "host", "port"))
    if args.start >= args.end:
        print(f"tokentill: --start ({args.start}) must be before --end", file=sys.stderr)
        return 2
    out = Path(args.out or f"tokentill-focus-{args.start}-{args.end}.{args.format}")
    conn = None
    if settings.lake_catalog is None:
        try:
            conn = open_warehouse(settings.db)
        except WarehouseBusyError:
            conn = None
    if conn is None:
        url = f"http://{settings.host}:{settings.port}/api/exports/focus"
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        params = {"start": str(args.start), "end": str(args.end), "format": args.format}
        try:
            with (
                httpx.stream(
                    "GET",
                    url,
                    params=params,
                    headers={"Authorization": f"Bearer {token}"} if token else {},
                    timeout=None,
                ) as answer,
                open(out, "wb") as target,
            ):
                if answer.status_code != 200:
                    answer.read()
                    print(f"tokentill: {url}: {answer.status_code} {answer.text}", file=sys.stderr)
                    return 1
                for chunk in answer.iter_bytes():
                    target.write(chunk)
                unpriced = answer.headers.get("x-tokentill-unpriced-rows", "?")
        except httpx.HTTPError as exc:
            print(f"tokentill: could not reach the server at {url}: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            seed_published(conn)
            export = read_focus(conn, args.start, args.end, settings)
        finally:
            conn.close()
        chunks = csv_chunks if args.format == "csv" else parquet_chunks
        with open(out, "wb") as target:
            for chunk in chunks(export.rows):
                target.write(chunk)
        unpriced = str(export.unpriced_rows)
    print(f"tokentill: FOCUS {args.format} written to {out} ({unpriced} unpriced rows)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import threading

    from tokentill import demo
    from tokentill.app import create_app
    from tokentill.server import serve

    if not args.verbose:
        # One status line says what happens; the server speaks up only when something
        # goes wrong (a line per proxied request would bury it).
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("tokentill.alerts").setLevel(logging.ERROR)  # on the dashboard
    fake, fake_thread = demo.start_fake_upstream("127.0.0.1", args.fake_port)
    settings = Settings(
        db=args.db,
        upstream=f"http://127.0.0.1:{args.fake_port}",
        host=args.host or "127.0.0.1",
        port=args.port or 8787,
        abuse_interval=120.0,
    )
    base = f"http://127.0.0.1:{settings.port}"
    stop = threading.Event()
    progress = demo.Progress()

    status = threading.Thread(
        target=demo.show_status, args=(base, progress, stop), name="demo-status", daemon=True
    )

    def traffic() -> None:
        if not demo.wait_healthy(base):
            return
        print(f"tokentill demo: the dashboard is at {base}/dashboard/", flush=True)
        print(f"tokentill demo: the proxy is {base}/v1, the warehouse {settings.db}", flush=True)
        status.start()
        if not args.no_showcase and not stop.is_set():
            demo.Showcase(base, progress).run()
        demo.generate_traffic(base, rate=args.rate, stop=stop, progress=progress)

    sender = threading.Thread(target=traffic, name="demo-traffic", daemon=True)
    sender.start()
    try:
        ok = serve(
            create_app(settings),
            settings.host,
            settings.port,
            header_timeout=settings.header_timeout,
            max_connections=settings.max_connections,
            log_level="info" if args.verbose else "warning",
        )
    finally:
        stop.set()
        fake.should_exit = True
        # Joined, not left to the interpreter's exit: a daemon thread still inside a C
        # extension while Python finalizes crashed the demo at shutdown (SIGSEGV), now
        # and then. A thread still in a long call after its budget is left as before.
        for thread in (sender, status, fake_thread):
            if thread.is_alive() or thread.ident is not None:
                thread.join(timeout=10)
    return 0 if ok else 1


def _cmd_fake_upstream(args: argparse.Namespace) -> int:
    from tokentill.fakeai import run_fake_upstream
    from tokentill.fakeai.errors import OpenAIError
    from tokentill.fakeai.wire import parse_wire

    try:
        wire = parse_wire(args.wire)
    except OpenAIError as exc:
        print(f"tokentill fake-upstream: --wire {args.wire!r}: {exc.message}", file=sys.stderr)
        return 2
    run_fake_upstream(args.host, args.port, seed=args.seed, wire=wire)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokentill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy, the writer and the admin surfaces")
    serve.add_argument("--db", help="DuckDB file (env TOKENTILL_DB; default data/tokentill.duckdb)")
    serve.add_argument("--upstream", help="OpenAI base URL (env TOKENTILL_UPSTREAM)")
    serve.add_argument("--host", help="bind address (env TOKENTILL_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env TOKENTILL_PORT; default 8787)")
    serve.add_argument(
        "--role",
        choices=("all", "proxy", "worker", "api"),
        help="what this process does on a lake (env TOKENTILL_ROLE; default all)",
    )
    serve.add_argument(
        "--prices",
        dest="prices_file",
        type=Path,
        help="operator prices, TOML (env TOKENTILL_PRICES_FILE)",
    )
    serve.set_defaults(func=_cmd_serve)

    rollup = sub.add_parser("rollup", help="price and roll up usage once")
    rollup.add_argument("--db", help="DuckDB file (env TOKENTILL_DB)")
    rollup.add_argument("--host", help="where the running server is, if it holds the file")
    rollup.add_argument("--port", type=int)
    rollup.add_argument("--full", action="store_true", help="rebuild every rollup from scratch")
    rollup.set_defaults(func=_cmd_rollup)

    export = sub.add_parser("export", help="export costs in another tool's standard")
    kinds = export.add_subparsers(dest="kind", required=True)
    focus = kinds.add_parser("focus", help="FOCUS 1.2 (and 1.0) rows, CSV or Parquet")
    focus.add_argument("--start", type=date.fromisoformat, required=True, help="first UTC day")
    focus.add_argument("--end", type=date.fromisoformat, required=True, help="day after the last")
    focus.add_argument("--format", choices=("csv", "parquet"), default="csv")
    focus.add_argument("--out", help="the file (default: tokentill-focus-<start>-<end>.<format>)")
    focus.add_argument("--db", help="DuckDB file (env TOKENTILL_DB)")
    focus.add_argument("--host", help="where the running server is, if it holds the file")
    focus.add_argument("--port", type=int)
    focus.set_defaults(func=_cmd_export_focus)

    demo = sub.add_parser("demo", help="serve in front of the fake upstream, with traffic")
    demo.add_argument("--db", type=Path, default=Path("data/demo.duckdb"))
    demo.add_argument("--host", default=None)
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--fake-port", type=int, default=8788)
    demo.add_argument("--rate", type=float, default=20.0, help="calls per second")
    demo.add_argument(
        "--no-showcase", action="store_true", help="live traffic only: no history, quotas, abuse"
    )
    demo.add_argument("--verbose", action="store_true", help="log every request, as serve does")
    demo.set_defaults(func=_cmd_demo)

    fake = sub.add_parser("fake-upstream", help="run the built-in fake OpenAI API")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8788)
    fake.add_argument("--seed", type=int, default=None)
    fake.add_argument(
        "--wire",
        default="compact",
        help="how answers are spelled: compact (OpenAI's), spaced, crlf, random, ... "
        "(see tokentill.fakeai.wire)",
    )
    fake.set_defaults(func=_cmd_fake_upstream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: far too much on a proxy's hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A malformed upload is the upstream's to refuse; its parser would log each one.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    try:
        result: int = args.func(args)
    except ValidationError as exc:
        print(f"tokentill: bad settings:\n{exc}", file=sys.stderr)
        return 2
    return result
