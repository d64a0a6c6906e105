"""Settings of the confirm stream (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from mailbus.settings import ServiceSettings
from mailbus.topics import MESSAGE_PARTITIONS


class ConfirmSettings(ServiceSettings):
    """The confirm stream's one settings object."""

    service_name: str = "confirm"
    # The join's state lives in Kafka (Faust tables); it opens no database connection.
    uses_postgres: ClassVar[bool] = False
    # How often the timer looks for sent messages past their deadline.
    timer_seconds: float = Field(default=30.0, gt=0)
    # The deadline for a message whose account the accounts file does not know.
    default_confirm_within_seconds: int = Field(default=3600, ge=1)
    # Must equal the partition count of the per-message topics: the state
    # table's changelog partition p holds the messages of source partition p.
    table_partitions: int = Field(default=MESSAGE_PARTITIONS, ge=1)
    # Replication of the changelog topic Faust creates (1 on the one-node stack).
    changelog_replicas: int = Field(default=1, ge=1)
    # An agent handles up to batch_size events at once, or what arrived
    # within batch_seconds.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    batch_seconds: float = Field(default=0.5, gt=0)
    # How often Faust commits consumed offsets (its own default is 2.8 s).
    commit_interval_seconds: float = Field(default=2.8, gt=0)
    # How long the group waits for a silent worker before giving its
    # partitions to another (Faust's default; the broker's minimum is 6 s).
    session_timeout_seconds: float = Field(default=60.0, ge=6)
    # A message's state is dropped this long after its last change once it
    # has a verdict (or was never sent); longer than the topics' 30-day
    # retention, so no replay can bring its events back after that.
    forget_after_seconds: int = Field(default=35 * 24 * 3600, ge=60)
    # Prometheus metrics on http://metrics_host:metrics_port/metrics; 0 disables.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # How often the group's consumer lag is measured.
    lag_seconds: float = Field(default=10.0, gt=0)
    # Faust's working directory (with the memory store it holds only empty folders).
    data_dir: Path | None = None

    @model_validator(mode="after")
    def _data_dir(self) -> ConfirmSettings:
        if self.data_dir is None:
            self.data_dir = self.var_dir / "confirm"
        return self
