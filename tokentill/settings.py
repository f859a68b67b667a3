"""The one typed settings object. Built once (from flags, env and defaults), checked, passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

Seconds = Annotated[float, Field(gt=0)]
# What a Stripe meter event's value is, per response (docs/billing-sinks.md).
StripeValue = Literal[
    "total_tokens",
    "input_tokens",
    "uncached_input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "requests",
    "cost_usd",
]


class BillingSink(BaseModel):
    """One billing sink (docs/billing-sinks.md): where metered usage is pushed, as whom,
    and which of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Its name: the key of its place in the events (renaming it starts it afresh).
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
    # `cloudevents`: one CloudEvent per response, POSTed in batches (OpenMeter's ingest
    # endpoint); `stripe`: one meter event per response (`/v1/billing/meter_events`).
    kind: Literal["cloudevents", "stripe"]
    # CloudEvents: the ingest URL (https://openmeter.cloud/api/v1/events). Stripe: the
    # API's base URL (https://api.stripe.com).
    url: str
    # CloudEvents: a bearer token (optional). Stripe: its secret key (required).
    secret: SecretStr | None = None
    # Who is billed: `user` (the end user) or `tag:<key>` (a metadata tag, `customer`).
    subject: Annotated[str, Field(pattern=r"^(user|tag:[A-Za-z_][A-Za-z0-9_]{0,63})$")] = "user"
    # Only these subjects (empty: every one that has a value).
    only: tuple[str, ...] = ()
    # Responses created before this are not sent (unset: the sink starts with the events
    # committed after its first run).
    since: datetime | None = None
    # The CloudEvent's `type`, or the Stripe meter's `event_name`.
    event_type: Annotated[str, Field(min_length=1, max_length=100)] = "tokentill.usage"
    # The CloudEvent's `source` (with its `id`, what OpenMeter deduplicates on).
    source: Annotated[str, Field(min_length=1, max_length=256)] = "tokentill"
    # Stripe: the meter event's value, and the payload keys of the meter's customer
    # mapping and value settings; `customers` maps subjects to Stripe customer ids
    # (unmapped subjects are sent as they are).
    value: StripeValue = "total_tokens"
    customer_key: Annotated[str, Field(min_length=1, max_length=100)] = "stripe_customer_id"
    value_key: Annotated[str, Field(min_length=1, max_length=100)] = "value"
    customers: dict[str, str] = Field(default_factory=dict)
    # An alert is raised when the oldest undelivered event is older than this.
    lag_alert: Seconds = 900.0
    # Seconds to wait for the receiver's answer.
    timeout: Seconds = 10.0
    # Stripe: meter events in flight at once (one request each; Stripe takes about 1,000
    # a second in live mode, so at 150 ms a request 64 reach ~400 a second).
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("a billing sink's url must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("since")
    @classmethod
    def _since_is_utc(cls, value: datetime | None) -> datetime | None:
        # A moment without a zone is read as UTC, as every time in tokentill is.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @model_validator(mode="after")
    def _stripe_has_a_key(self) -> BillingSink:
        if self.kind == "stripe" and self.secret is None:
            raise ValueError(f"billing sink {self.name!r}: Stripe needs its secret key")
        return self


class Settings(BaseSettings):
    """Everything tokentill can be told. Env vars are TOKENTILL_<NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENTILL_", extra="forbid", frozen=True, env_ignore_empty=True
    )

    # The warehouse: one DuckDB file (its journal and checkpoints sit beside it).
    db: Path = Path("data/tokentill.duckdb")
    # A cluster (docs/cluster.md): the warehouse as a DuckLake shared by every instance,
    # its catalog in this PostgreSQL database (a libpq string or a postgresql:// URL)
    # and its data under `lake_data` (a directory every instance sees, or s3://...).
    # Both unset: the one DuckDB file above, one process.
    lake_catalog: SecretStr | None = None
    lake_data: str | None = None
    # An S3-compatible store for `lake_data` (MinIO, say): host:port, and whether it
    # speaks TLS. Credentials come from the usual AWS_* variables.
    lake_s3_endpoint: str | None = None
    lake_s3_use_ssl: bool = True
    # This instance's name in the lake, stable across its restarts: its journal's
    # checkpoint is kept under it. Required with a lake; one per journal directory.
    instance_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = None
    # How often the active worker keeps a lake up (docs/cluster.md, "Upkeep"), and how
    # long old snapshots and their files are kept for queries still reading them.
    lake_upkeep_interval: Seconds = 3600.0
    lake_keep_snapshots: Seconds = 3600.0
    # What this process does: `proxy` (forward and meter), `worker` (the scheduled
    # jobs), `api` (the admin API and the dashboard), or `all` of them.
    role: Literal["all", "proxy", "worker", "api"] = "all"
    # Where /v1 is forwarded: OpenAI, or anything that speaks its API.
    upstream: str = "https://api.openai.com"
    # Where tokentill listens (the proxy, the admin API and the dashboard on one port).
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8787
    # The bearer token of the admin API and the dashboard's login (16+ characters).
    # Without one they answer loopback clients only.
    admin_token: SecretStr | None = None

    # The capture journal: where finished responses are appended before the client
    # gets its last byte. Defaults to `<db>.journal/` beside the database.
    journal_dir: Path | None = None
    # How often the journal is fsynced (group fsync). A kill -9 loses nothing
    # (the bytes are in the kernel); a power cut loses at most this window.
    journal_fsync_interval: Seconds = 0.05
    # A journal segment is closed (and later deleted, once in DuckDB) past this size.
    journal_segment_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024 * 1024

    # The one writer: events are inserted into DuckDB in batches of at most this many,
    # at least this often.
    writer_batch_max: Annotated[int, Field(ge=1)] = 20_000
    # Lines held in memory for the warehouse. Past it (the warehouse away for long: a
    # lake's catalog down, a full disk), the journal alone holds the next ones, and the
    # writer reads them back from it once it catches up: memory stays bounded.
    writer_queue_max: Annotated[int, Field(ge=1)] = 200_000
    writer_flush_interval: Seconds = 0.5

    # The upstream client: connect and read timeouts, pooled connections.
    upstream_connect_timeout: Seconds = 10.0
    upstream_read_timeout: Seconds = 600.0
    upstream_max_connections: Annotated[int, Field(ge=1)] = 512
    # Request bodies above this are refused with 413 before reaching the upstream.
    max_request_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # Non-streamed answers are copied aside for parsing up to this size.
    max_parsed_response_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024

    # After a client disconnects mid-stream, keep reading the upstream this long to
    # learn the real usage (the upstream bills what it generated, not what we forwarded).
    stream_drain_timeout: Seconds = 120.0
    # Background responses (and interrupted streams) are polled until terminal, with
    # the caller's credentials held in memory only, for at most this long.
    background_poll_max: Seconds = 6 * 3600.0
    # A batch (Batch API) is watched until it ends, for at most this long (OpenAI's
    # completion window is a day).
    batch_watch_max: Seconds = 26 * 3600.0
    # Polling backs off from the first interval to the second.
    background_poll_min_interval: Seconds = 1.0
    background_poll_max_interval: Seconds = 60.0
    # A key of the same OpenAI project, for settling responses whose process died while
    # they were pending (docs/cluster.md, "Settlement"): held in memory, never written.
    # Without it such responses stay pending, counted in the log.
    settlement_api_key: SecretStr | None = None
    # How often pending responses with no poller are looked for (and settled).
    settlement_interval: Seconds = 60.0
    # A stream is journaled as pending at its start and recorded by its own proxy at its
    # end; the sweep leaves a pending stream to it for this long (on a lake, another live
    # proxy's; on one process, only at start is every pending stream an orphan).
    settlement_stream_grace: Seconds = 900.0

    # End-user ids (ingest/identity.py): always UTF-8, NFC, trimmed, no control
    # characters; with this, case-folded too (`QA-Alice` and `qa-alice` are one user).
    user_id_case_fold: bool = False
    # X-Tokentill-User and the body's user/safety_identifier name different users: the
    # header wins and both are kept; with this, such requests are refused (400).
    refuse_user_mismatch: bool = False

    # The admin surfaces (/api, /dashboard) answer only to these Host names (with or
    # without a port); empty: the loopback names and `host` when it is an address of
    # its own. "*" answers to any (behind a proxy that checks Host itself).
    allowed_hosts: tuple[str, ...] = ()
    # Guessing the admin token: this many failures from one address within the window
    # lock that address out for the window (429), with a metric and an alert.
    auth_failure_limit: Annotated[int, Field(ge=1)] = 10
    auth_failure_window: Seconds = 60.0
    # Connections: a request's headers must arrive within `header_timeout` (slow
    # senders are dropped); past `max_connections` open connections and requests,
    # new requests get 503.
    header_timeout: Seconds = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 2048

    # DuckDB's buffer pool (its cache of what it read) stays within this.
    warehouse_memory_limit: str = "2GB"

    # Money. Operator prices (TOML) loaded at start on top of the published catalog.
    prices_file: Path | None = None
    # How often the rollup job runs inside the server (seconds).
    rollup_interval: Seconds = 60.0
    # Incremental runs append their partial sums as parts; a day is compacted (its parts
    # folded into one row per key) once it has more than this many parts...
    rollup_compact_parts: Annotated[int, Field(ge=0, le=100_000)] = 60
    # ...and every day that ended more than this many seconds ago is compacted.
    rollup_compact_after: Seconds = 6 * 3600.0
    # Metadata keys rolled up per day (team, feature, customer...).
    rollup_tag_keys: tuple[str, ...] = ("project", "team", "feature", "customer")
    # The FOCUS export's BillingAccountId and BillingAccountName (api/exports.py): your
    # OpenAI organization, as your FinOps tool should name it.
    focus_billing_account: Annotated[str, Field(min_length=1, max_length=256)] = "openai"
    # Billing sinks (docs/billing-sinks.md): usage pushed to OpenMeter (CloudEvents) or
    # Stripe (meter events) by the worker, exactly once, each sink at its own pace. A
    # JSON list of objects: name, kind, url, secret, subject, only, since, event_type,
    # source, value, customer_key, value_key, customers, lag_alert, timeout, concurrency.
    billing_sinks: tuple[BillingSink, ...] = ()
    # How often each sink looks for new usage (and retries, backing off, after a failure).
    billing_sink_interval: Seconds = 10.0
    # The model whose image rates price the image_generation tool's tokens.
    image_gen_model: str = "gpt-image-1"

    # Reconciliation against OpenAI's bill: an admin key (sk-admin-...) reads its
    # organization Costs and Usage; `openai_admin_url` defaults to the upstream.
    openai_admin_key: SecretStr | None = None
    openai_admin_url: str | None = None
    # A day x model is flagged when |OpenAI's figure - ours| passes this many USD and, when
    # the ratio is above 0, that fraction of OpenAI's figure too (big bills have noise).
    reconcile_threshold_usd: Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)] = (
        Decimal("0.01")
    )
    reconcile_threshold_ratio: Annotated[Decimal, Field(ge=0, le=1, decimal_places=6)] = Decimal(0)

    # Quotas (warehouse/quota_book.py). Off: no admission check and no live counting at all.
    quotas_enabled: bool = True
    # Metadata keys whose values can carry a quota (counted live for every value seen).
    quota_tag_keys: tuple[str, ...] = ("project", "team", "feature", "customer")
    # Output tokens reserved for a request that states no bound of its own.
    quota_output_cap: Annotated[int, Field(ge=1)] = 16_384
    # Web search calls reserved per request offering the tool, when it states no
    # max_tool_calls (each call is billed: a response making more can overshoot a limit).
    quota_tool_calls: Annotated[int, Field(ge=0)] = 3
    # Quota counters kept in memory; past this, those idle for `quota_spill_after` and
    # holding no reservation are spilled and read back from the warehouse on return.
    quota_max_counters: Annotated[int, Field(ge=1)] = 100_000
    quota_spill_after: Seconds = 60.0
    # Input reserved as body bytes / this. 1 is a true bound for text (every token is at
    # least one byte); more reserves less and lets the real input exceed the reservation.
    quota_input_bytes_per_token: Annotated[int, Field(ge=1, le=16)] = 1
    # Input tokens reserved per image in the body (high-detail images cost up to ~1,800).
    quota_image_tokens: Annotated[int, Field(ge=0)] = 2_000
    # Context reserved for a previous_response_id (or conversation) the proxy has not
    # seen finish since it started.
    quota_unknown_context_tokens: Annotated[int, Field(ge=0)] = 8_192
    # How often the proxy's in-memory price snapshot is rebuilt from the catalog.
    quota_price_refresh: Seconds = 30.0
    # Quotas across instances (docs/quotas.md, "Across proxies"): the counters,
    # reservations, limit versions and blocks in this Redis (redis://host:port/db).
    # Needed when quotas are on with a lake; unset on one process (counters in memory).
    redis_url: SecretStr | None = None
    # When Redis cannot be reached: `refuse` the requests of users and tags held to
    # limits (503 in OpenAI's shape), or `serve` them unchecked (counted when it returns).
    quota_redis_outage: Literal["refuse", "serve"] = "refuse"
    # How often each instance reads the limits' version and the blocks from Redis.
    quota_redis_poll: Annotated[float, Field(gt=0, le=10)] = 0.25

    # Abuse monitoring (warehouse/abuse.py): how often it runs, the scored window, and
    # how much of each user's history it compares against.
    abuse_interval: Seconds = 300.0
    abuse_window: Annotated[int, Field(ge=60, le=86_400)] = 3600
    abuse_history_days: Annotated[int, Field(ge=1, le=90)] = 14
    # A critical abuse flag blocks the user's requests (403) this long; 0: never.
    abuse_block_seconds: Annotated[int, Field(ge=0, le=30 * 86_400)] = 0

    # Alerts (quota thresholds, abuse flags) are POSTed here as JSON, signed with
    # HMAC-SHA256 of the body under the secret (X-Tokentill-Signature: sha256=<hex>).
    alert_webhook_url: str | None = None
    alert_webhook_secret: SecretStr | None = None
    alert_webhook_max_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    alert_webhook_backoff: Seconds = 1.0

    # How long a dashboard login (its signed session cookie) lasts.
    session_lifetime: Seconds = 12 * 3600.0

    # SIGTERM: in-flight requests get this long to finish; then the journal is
    # flushed into DuckDB. The whole shutdown stays under 10 s.
    shutdown_grace: Annotated[int, Field(ge=1, le=8)] = 5

    @field_validator("upstream", "openai_admin_url")
    @classmethod
    def _upstream_is_http(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{info.field_name} must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("quota_tag_keys")
    @classmethod
    def _tag_keys_are_plain(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            if not key or len(key) > 64 or '"' in key or "\\" in key:
                raise ValueError(f"quota tag key {key!r}: 1 to 64 characters, no quotes")
        return value

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("alert_webhook_url must be an http:// or https:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_is_a_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _lake_is_whole(self) -> Settings:
        if (self.lake_catalog is None) != (self.lake_data is None):
            raise ValueError("lake_catalog and lake_data go together: set both, or neither")
        if self.lake_catalog is not None and self.instance_id is None:
            raise ValueError("a lake needs instance_id: a stable name per journal directory")
        if self.lake_catalog is None and self.role != "all":
            raise ValueError(
                f"role {self.role!r} needs a lake (lake_catalog, lake_data): "
                "one DuckDB file is owned by one process, which plays every role"
            )
        if self.lake_catalog is not None and self.quotas_enabled and self.redis_url is None:
            # Refused loudly rather than enforced per process (docs/cluster.md).
            raise ValueError(
                "quotas across instances need their shared counters: set redis_url "
                "(redis://host:port/db), or quotas_enabled=false on a lake's instances"
            )
        return self

    @property
    def proxies(self) -> bool:
        """Whether this process forwards /v1 and meters it (its writer and journal)."""
        return self.role in ("all", "proxy")

    @property
    def works(self) -> bool:
        """Whether this process runs the scheduled jobs."""
        return self.role in ("all", "worker")

    @property
    def serves_admin(self) -> bool:
        """Whether this process serves the admin API and the dashboard."""
        return self.role in ("all", "api")

    @field_validator("billing_sinks")
    @classmethod
    def _sinks_have_names(cls, value: tuple[BillingSink, ...]) -> tuple[BillingSink, ...]:
        names = [sink.name for sink in value]
        if len(set(names)) != len(names):
            raise ValueError("billing sinks need names of their own")
        return value

    @model_validator(mode="after")
    def _admin_token_is_strong(self) -> Settings:
        token = self.admin_token
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        return self

    @property
    def openai_admin_base(self) -> str:
        """Where OpenAI's organization Costs and Usage are read (the upstream by default)."""
        return self.openai_admin_url or self.upstream

    @property
    def journal_path(self) -> Path:
        return self.journal_dir or self.db.with_name(self.db.name + ".journal")
