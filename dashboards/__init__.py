"""The dashboard: server-rendered Plotly views under /dashboard, behind a login.

`routers()` is what the composition root (tokentill/app.py) includes.
"""

from __future__ import annotations

from fastapi import APIRouter

from tokentill.dashboards import assets, login, views


def routers() -> list[APIRouter]:
    return [assets.router, login.router, views.root, views.router]
