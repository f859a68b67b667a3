"""What a billing sink costs: events per second pushed to a CloudEvents receiver and to a
Stripe stand-in, against the floor of reading and pricing the same events.

One run, in a fresh DuckDB file in a temporary directory:

1. generates `--events` synthetic usage events (bench/rollup.py's generator: skewed end
   users, 20 models, every status, tag metadata) and seeds the price catalog;
2. the floor: the sink's own pipeline without sending (each page read after the mark,
   priced and split into charges, each record's CloudEvent written): what any sink pays;
3. a CloudEvents sink (batches of 100) to a receiver on a loopback port that counts the
   events it is sent, from the first event to the last, its mark moved page by page;
4. a Stripe sink (one meter event per request, 8 at once, through the stripe SDK) to a
   stand-in that counts them, on the first `--stripe-events` events.

The receivers only count: the figures are the sender's. Ratios are against the floor,
measured in the same run. A sink keeps up when its rate is above the rate the proxy
meters at (docs/performance.md: about 4,500 responses a second a core).

    python bench/sinks.py [--events 200000] [--stripe-events 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import uvicorn
from _common import free_port, make_workdir
from prometheus_client import CollectorRegistry
from rollup import phase_generate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokentill.billing_sinks import BillingSinkJob, SinkMetrics
from tokentill.billing_targets import CloudEventsTarget, StripeTarget
from tokentill.settings import BillingSink
from tokentill.warehouse.billing_usage import Mark, head, read_page, sink_records
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.prices import CatalogCache

SINCE = "2000-01-01T00:00:00Z"


class Counter:
    def __init__(self) -> None:
        self.events = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.events += n


def receivers(counted: Counter) -> Starlette:
    async def cloudevents(request: Request) -> Response:
        counted.add(len(orjson.loads(await request.body())))
        return Response(status_code=204)

    async def stripe(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        counted.add(1)
        body = {"object": "billing.meter_event", "identifier": form.get("identifier")}
        return Response(orjson.dumps(body), media_type="application/json")

    return Starlette(
        routes=[
            Route("/api/v1/events", cloudevents, methods=["POST"]),
            Route("/v1/billing/meter_events", stripe, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def serving(app: Starlette) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def floor(db: Path, sink: BillingSink) -> tuple[int, float]:
    """The pipeline alone: read, price, write each record's CloudEvent; nothing sent."""
    conn = open_warehouse(db)
    target = CloudEventsTarget(sink)
    try:
        started = time.perf_counter()
        prices = CatalogCache().read(conn)
        upto, mark, done = head(conn), Mark(sink.name, 0), 0
        while True:
            page = read_page(conn, mark, upto, 2000)
            if page.height == 0:
                break
            records, _ = sink_records(
                page, prices, image_model="gpt-image-1", subject=sink.subject, since=sink.since
            )
            for record in records.to_dicts():
                target.event(record)
            done += records.height
            mark = mark.past(page)
        return done, time.perf_counter() - started
    finally:
        target.close()
        conn.close()


def run_sink(db: Path, sink: BillingSink) -> float:
    """The sink's job, run after run, until it has passed every event."""
    job = BillingSinkJob(
        sink,
        StripeTarget(sink) if sink.kind == "stripe" else CloudEventsTarget(sink),
        lambda: open_warehouse(db),
        CatalogCache(),
        image_model="gpt-image-1",
        alert=lambda alerts: None,
        metrics=SinkMetrics(CollectorRegistry()),
        interval=1.0,
    )
    started = time.perf_counter()
    try:
        while True:
            done = job.run()
            if done is None or done.error:
                raise SystemExit(f"sink {sink.name} failed: {done}")
            if done.caught_up:
                return time.perf_counter() - started
    finally:
        job.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--stripe-events", type=int, default=20_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = make_workdir("tokentill-bench-sinks-")
    db, small = work / "sinks.duckdb", work / "stripe.duckdb"
    try:
        made = phase_generate(db, args.events)
        phase_generate(small, args.stripe_events)
        print(f"generated {made['events']:,} events in {made['generate_s']:.1f} s")
        counted = Counter()
        with serving(receivers(counted)) as url:
            events = BillingSink.model_validate(
                {
                    "name": "openmeter",
                    "kind": "cloudevents",
                    "url": url + "/api/v1/events",
                    "subject": "user",
                    "since": SINCE,
                }
            )
            stripe = BillingSink.model_validate(
                {
                    "name": "stripe",
                    "kind": "stripe",
                    "url": url,
                    "secret": "sk_test_bench",
                    "subject": "user",
                    "since": SINCE,
                }
            )
            sent, floor_s = floor(db, events)
            floor_rate = sent / floor_s
            print(f"floor (read, price, write CloudEvents): {sent:,} records, {floor_rate:,.0f}/s")
            ce_rate = sent / run_sink(db, events)
            if counted.events != sent:
                raise SystemExit(f"the receiver counted {counted.events:,}, not {sent:,}")
            print(f"cloudevents sink: {sent:,} delivered, {ce_rate:,.0f}/s")

            part, part_s = floor(small, stripe)
            small_floor = part / part_s
            counted.events = 0
            stripe_rate = part / run_sink(small, stripe)
            if counted.events != part:
                raise SystemExit(f"the stand-in counted {counted.events:,}, not {part:,}")
            print(f"stripe sink: {part:,} delivered, {stripe_rate:,.0f}/s")
        print()
        print("| sink | events/s | time vs the floor |")
        print("| --- | --- | --- |")
        print(f"| floor: read + price + encode ({sent:,}) | {floor_rate:,.0f} | 1.00x |")
        print(f"| CloudEvents, batches of 100 | {ce_rate:,.0f} | {floor_rate / ce_rate:.2f}x |")
        print(f"| floor ({part:,}) | {small_floor:,.0f} | 1.00x |")
        print(
            f"| Stripe, one request per event, 8 at once | {stripe_rate:,.0f} | "
            f"{small_floor / stripe_rate:.2f}x |"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
