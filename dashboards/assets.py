"""The dashboard's static files: plotly.js from the plotly package itself (no CDN: the
page works on a machine with no internet) and the dashboard's own script and styles."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import Response

router = APIRouter(prefix="/dashboard/assets", include_in_schema=False)

_FILES = {
    "plotly.min.js": ("plotly", "package_data/plotly.min.js", "text/javascript"),
    "dashboard.js": ("tokentill.dashboards", "static/dashboard.js", "text/javascript"),
    "dashboard.css": ("tokentill.dashboards", "static/dashboard.css", "text/css"),
}


@functools.cache
def _read(name: str) -> bytes:
    package, path, _ = _FILES[name]
    return (resources.files(package) / path).read_bytes()


@router.get("/{name}")
async def asset(name: str) -> Response:
    if name not in _FILES:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
    return Response(
        _read(name),
        media_type=_FILES[name][2],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
