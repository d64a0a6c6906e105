"""Settings of the sender (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from mailbus.settings import ServiceSettings


class SenderSettings(ServiceSettings):
    """The sender's one settings object."""

    service_name: str = "sender"
    group_id: str = "mailbus-sender"
    # Hand-over attempts before a transiently failing message is given up
    # and dead-lettered; retries wait retry_base * 2^(n-1) s (jittered, capped).
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_cap_seconds: float = Field(default=3600.0, gt=0)
    # How often an idle account worker looks for due messages; new arrivals
    # wake it at once, so this only bounds how late a scheduled send starts.
    poll_seconds: float = Field(default=1.0, gt=0)
    # Rows an account claims per connection ahead of sending them (one claim
    # statement feeds many sends), and how long the settler lets outcomes
    # gather before committing them in one transaction.
    claim_depth: int = Field(default=16, ge=1, le=1000)
    settle_window_seconds: float = Field(default=0.0, ge=0, le=1)
    # Messages per connection the server took that may await their settle while
    # the connection sends the next: more is faster (a settle's commit and fsync
    # take milliseconds), and is what a crash may send twice (each flagged
    # possible_duplicate) on top of one per connection.
    settling_per_connection: int = Field(default=16, ge=0, le=1000)
    # Files of recent messages kept in memory (MiB), so messages sharing a file
    # read it from PostgreSQL about once a minute (attachments.BlobCache); 0: off.
    attachment_cache_mib: int = Field(default=64, ge=0, le=4096)
    # Worker processes that compose claimed batches off the event loop
    # (services/sender/composer.py); 0: compose on the loop.
    compose_processes: int = Field(default=1, ge=0, le=16)
    # Public base URL of the hooks service, where action and unsubscribe links point.
    hooks_base_url: str = "http://127.0.0.1:8081"
    link_keys_file: Path | None = None
    link_ttl_days: int = Field(default=30, ge=1, le=365)
    unsubscribe_mailto: str | None = None
    # Add a 1x1 open-tracking image to html mail (the hooks service records
    # the loads as unreliable opens when its own open_tracking is on).
    open_tracking: bool = False
    # Retention of settled ledger rows (sent, failed, rerouted), from settlement.
    # At least 24 h: the rolling quota is rebuilt from the last day's sends.
    # Cancelled rows too. The default (38 days) outlives email.requested's
    # 37-day retention (topics.REQUESTED_RETENTION_MS: the 30-day scheduling
    # horizon and a week), so a replay of the topic (an offset reset) still
    # finds every row, sends nothing twice and nothing cancelled.
    ledger_retention_hours: float = Field(default=912.0, ge=24)
    # A settled row's request bytes (addresses, bodies) are cleared after this:
    # nothing reads them again, and the same bytes stay on email.requested
    # (37 days) and, for failures, email.requested.dlq (30 days).
    ledger_payload_retention_hours: float = Field(default=24.0, ge=0)
    # How often the sender prunes, and how many rows one statement touches.
    ledger_prune_seconds: float = Field(default=300.0, gt=0)
    ledger_prune_batch: int = Field(default=1000, ge=1, le=100_000)
    # Requests written by `mailbus replay` (they carry its source header) go to
    # this SMTP server, HOST:PORT without TLS (the development server by
    # default), whatever account they name: a replay never mails real people...
    replay_sink: str = Field(default="127.0.0.1:2525", pattern=r"^[^\s:]+:\d{1,5}$")
    # ...unless this is set: replayed requests then leave through the accounts'
    # own transports, as real mail.
    replay_to_real_accounts: bool = False
    # A log line per period with what each account handled (sent, failed, to
    # retry, rerouted) and whether its transport is failing; 0: none.
    log_summary_seconds: float = Field(default=300.0, ge=0)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Gmail API endpoints: Google's unless overridden (the tests' emulator).
    gmail_api_endpoint: str | None = None
    gmail_token_uri: str | None = None

    @model_validator(mode="after")
    def _link_keys(self) -> SenderSettings:
        if self.link_keys_file is None:
            self.link_keys_file = self.var_dir / "secrets" / "link-keys.json"
        return self
