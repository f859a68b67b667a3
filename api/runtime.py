"""What the admin API and the dashboard need of the running service, stated here so that
they read the composition root through this face and never import it (the root's
`Runtime` has all of it; `tests/test_import_flow.py` checks the arrow).

Everything named here is either a warehouse type (the layer the API stands on) or a
protocol of this module. The handlers never see the proxy, its sockets or the alert
outbox.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

import duckdb
from pydantic import SecretStr

from tokentill.warehouse.abuse import AbuseJob
from tokentill.warehouse.jobs import RollupJob
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.quota_service import QuotaService
from tokentill.warehouse.writer import Writer


class AdminSettings(Protocol):
    """The settings the handlers read (tokentill's `Settings` has them all)."""

    @property
    def image_gen_model(self) -> str: ...
    @property
    def works(self) -> bool: ...  # runs the scheduled jobs (role all or worker)
    @property
    def role(self) -> str: ...
    @property
    def user_id_case_fold(self) -> bool: ...
    @property
    def rollup_tag_keys(self) -> tuple[str, ...]: ...
    @property
    def focus_billing_account(self) -> str: ...
    @property
    def quota_tag_keys(self) -> tuple[str, ...]: ...
    @property
    def openai_admin_key(self) -> SecretStr | None: ...
    @property
    def openai_admin_base(self) -> str: ...
    @property
    def upstream_connect_timeout(self) -> float: ...
    @property
    def reconcile_threshold_usd(self) -> Decimal: ...
    @property
    def reconcile_threshold_ratio(self) -> Decimal: ...


class AdminRuntime(Protocol):
    """`request.app.state.runtime`: set by the lifespan once everything it names runs."""

    @property
    def ready(self) -> bool: ...
    @property
    def settings(self) -> AdminSettings: ...
    @property
    def writer(self) -> Writer: ...  # its backlog and lag, for freshness and health
    @property
    def rollup(self) -> RollupJob: ...
    @property
    def abuse(self) -> AbuseJob: ...
    @property
    def catalog(self) -> CatalogCache: ...  # the one price snapshot
    @property
    def quotas(self) -> QuotaService | None: ...

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one thread's reads."""
        ...
