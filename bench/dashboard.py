"""How long the dashboard's pages take on a big warehouse.

Serves an existing warehouse (for example the one `bench/rollup.py --keep` leaves: 10M
synthetic events, rolled up) with `tokentill serve` on a loopback port, no admin token
(loopback needs no login), and times every view: the first load and the median of the
next ones, at the default range (30 days) and at 90 days, with a model filter and a tag
filter. Only the server's HTML is timed (the figures' JSON included); plotly.js draws
them in the browser afterwards.

    python bench/dashboard.py --db path/to/warehouse.duckdb [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from _common import (
    BenchError,
    Server,
    free_port,
    http_request,
    make_workdir,
    markdown_table,
    python_module_argv,
    remove_workdir,
)

TARGET_MS = 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = make_workdir("tokentill-bench-dashboard-")
    port = free_port()
    server = Server(
        "tokentill",
        python_module_argv("-m", "tokentill", "serve", "--db", str(args.db), "--port", str(port)),
        port,
        work / "tokentill.log",
    )
    # No rollup run during the timing: the warehouse is rolled up already.
    env = {k: v for k, v in os.environ.items() if k != "TOKENTILL_ADMIN_TOKEN"}
    server.start(env={**env, "TOKENTILL_ROLLUP_INTERVAL": "86400"})
    try:
        server.wait_http("/healthz", timeout=300)
        status, body = http_request(port, "GET", "/api/users?limit=1")
        if status != 200:
            raise BenchError(f"/api/users answered {status}")
        top = json.loads(body)["users"][0]["user_id"]
        status, body = http_request(port, "GET", "/api/models")
        model = json.loads(body)["models"][0]["model"]
        today = datetime.now(UTC).date()
        wide = f"from={today - timedelta(days=89)}&to={today}"
        pages = {
            "overview": "/dashboard/",
            "overview, 90 days": f"/dashboard/?{wide}",
            "overview, one model": f"/dashboard/?model={quote(model)}",
            "overview, tag team=team-1": "/dashboard/?tag=team%3Dteam-1",
            "users": "/dashboard/users",
            "users, 90 days": f"/dashboard/users?{wide}",
            "user page": f"/dashboard/users/{quote(top, safe='')}",
            "models": "/dashboard/models",
            "models, 90 days": f"/dashboard/models?{wide}",
            "tags": "/dashboard/tags?key=team",
            "quotas & alerts": "/dashboard/alerts",
        }
        rows = []
        for name, path in pages.items():
            times = []
            for _ in range(args.repeat + 1):
                clock = time.perf_counter()
                status, body = http_request(port, "GET", path, timeout=120)
                times.append((time.perf_counter() - clock) * 1000)
                if status != 200:
                    raise BenchError(f"{path} answered {status}: {body[:300]!r}")
            median = statistics.median(times[1:])
            rows.append(
                [
                    name,
                    f"{times[0]:,.0f} ms",
                    f"{median:,.0f} ms",
                    f"{len(body) / 1024:,.0f} KiB",
                    "met" if median < TARGET_MS else "missed",
                ]
            )
        print(
            markdown_table(
                ["page", "first load", f"median of {args.repeat}", "HTML", "< 1 s"], rows
            )
        )
    finally:
        server.stop()
        remove_workdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
