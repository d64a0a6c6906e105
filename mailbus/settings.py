"""Typed settings: one object per service, built in its main(), never at import.

Every value comes from the environment with the `MAILBUS_` prefix (nested
values with `__`, e.g. `MAILBUS_KAFKA__BOOTSTRAP_SERVERS`), and every secret
may instead come from a file (`..._FILE`), which is how the local stack and
container secrets hand them over. Outside local development a placeholder or
short secret, or a connection to Kafka or PostgreSQL without verified TLS,
refuses to start.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, ClassVar, Literal

from psycopg.conninfo import make_conninfo
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mailbus.errors import ConfigError

KAFKA_LOG = logging.getLogger("mailbus.kafka")

# The checkout this module runs from, when it runs from one (the editable
# install `make up` makes); an installed wheel has none, so nothing the services
# read at run time is looked for here (schemas and SQL are package data).
REPO_ROOT = Path(__file__).resolve().parent.parent
# State lives in the checkout's var/, where the stack's scripts put it; installed
# from a wheel, in var/ under the working directory (the image sets MAILBUS_VAR_DIR).
DEFAULT_VAR = REPO_ROOT / "var" if (REPO_ROOT / "pyproject.toml").is_file() else Path("var")

# Values people paste from examples; never acceptable outside local use.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "password", "admin", "dev"})
MIN_SECRET_LENGTH = 16
# The local stack's CA (scripts/tls.sh), trusted by default in local use only.
LOCAL_CA = Path("secrets") / "ca.crt"
# libpq modes that check the server's certificate against a CA; `require`
# encrypts but accepts any certificate, so a man in the middle still reads all.
VERIFYING_SSLMODES = ("verify-ca", "verify-full")


def read_secret(value: SecretStr | None, path: Path | None, what: str) -> str:
    """Return a secret given inline or in a file; ConfigError names the setting when neither."""
    if value is not None:
        return value.get_secret_value()
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {path}: {exc.strerror}") from exc
    raise ConfigError(f"{what}: no secret given (set it, or its _FILE)")


class KafkaSettings(BaseModel):
    """How a service reaches the broker, as its own SASL/SCRAM principal."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["SASL_PLAINTEXT", "SASL_SSL"] = "SASL_PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    username: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    # The CA that signed the broker's certificate (SASL_SSL only); when
    # unset, the system's CAs (and in local use the stack's var/secrets/ca.crt).
    ssl_ca_location: Path | None = None
    # Prepended to every topic and group name: lets tests (and several
    # installations sharing one cluster) keep apart without touching code.
    topic_prefix: str = ""
    # How long an event may wait for the broker's ack before the request
    # that carries it fails with 503.
    delivery_timeout_ms: int = Field(default=8000, ge=1000, le=300_000)

    def client_config(self) -> dict[str, Any]:
        """librdkafka's names for the connection and credentials, mapped once here."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "sasl.mechanisms": self.sasl_mechanism,
            "sasl.username": self.username,
            "sasl.password": read_secret(self.password, self.password_file, "kafka.password"),
            # librdkafka's own lines (a broker gone, a refused login) through Python's
            # logging, so they come out as every other line does (JSON on request),
            # not as raw text on stderr. A client hands them over when it is polled.
            "logger": KAFKA_LOG,
        }
        # Without a CA file librdkafka probes the system's CA paths. The
        # broker's host name is checked either way
        # (ssl.endpoint.identification.algorithm defaults to https since 2.0).
        if self.security_protocol == "SASL_SSL" and self.ssl_ca_location is not None:
            conf["ssl.ca.location"] = str(self.ssl_ca_location)
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS for Python clients (aiokafka under Faust): None in clear text, else verifying."""
        if self.security_protocol != "SASL_SSL":
            return None
        # create_default_context checks the certificate chain and the host
        # name, and refuses anything older than TLS 1.2.
        cafile = str(self.ssl_ca_location) if self.ssl_ca_location is not None else None
        return ssl.create_default_context(cafile=cafile)

    def topic(self, name: str) -> str:
        """The real topic name for a logical one such as `email.requested`."""
        return f"{self.topic_prefix}{name}"


class PostgresSettings(BaseModel):
    """How a service reaches PostgreSQL, as its own least-privileged role."""

    host: str = "127.0.0.1"
    port: int = 5433
    dbname: str = "mailbus"
    user: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    # libpq's own default; production requires verify-ca or verify-full.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        "prefer")
    # The CA for verify-ca/verify-full (in local use the stack's var/secrets/ca.crt).
    sslrootcert: Path | None = None
    pool_min: int = 1
    pool_max: int = 10

    def conninfo(self) -> str:
        """A libpq connection string; the password is quoted, never logged."""
        tls: dict[str, str] = {"sslmode": self.sslmode}
        if self.sslrootcert is not None:
            tls["sslrootcert"] = str(self.sslrootcert)
        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=self.dbname,
            user=self.user,
            password=read_secret(self.password, self.password_file, "postgres.password"),
            application_name="mailbus",
            **tls,
        )


class ServiceSettings(BaseSettings):
    """What every service shares: where state lives, the broker, the database."""

    model_config = SettingsConfigDict(
        env_prefix="MAILBUS_", env_nested_delimiter="__", extra="ignore"
    )

    # Which Kafka and PostgreSQL principal this service runs as.
    service_name: str = "service"
    env: Literal["local", "production"] = "local"
    var_dir: Path = DEFAULT_VAR
    accounts_file: Path | None = None
    # How often a service that reads the accounts file looks for a new version
    # of it (SIGHUP reloads at once).
    accounts_poll_seconds: float = Field(default=2.0, gt=0, le=3600)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    log_level: str = "INFO"
    # text: `time level logger: message key=value ...`; json: one object per line.
    log_format: Literal["text", "json"] = "text"
    # False for a service that never opens a database connection: its
    # container is given no database password, so none is checked.
    uses_postgres: ClassVar[bool] = True

    @model_validator(mode="after")
    def _local_defaults(self) -> ServiceSettings:
        # The local stack writes one secret file per principal under var/;
        # anything set explicitly wins.
        secrets = self.var_dir / "secrets"
        if not self.kafka.username:
            self.kafka.username = self.service_name
        if self.kafka.password is None and self.kafka.password_file is None:
            self.kafka.password_file = secrets / f"kafka-{self.kafka.username}.password"
        if not self.postgres.user:
            self.postgres.user = f"mailbus_{self.service_name}"
        if self.postgres.password is None and self.postgres.password_file is None:
            self.postgres.password_file = secrets / f"postgres-{self.postgres.user}.password"
        if self.accounts_file is None:
            self.accounts_file = self.var_dir / "accounts.toml"
        # Only in local use does the stack's own CA stand in for the system's.
        if self.env == "local":
            if self.kafka.security_protocol == "SASL_SSL" and self.kafka.ssl_ca_location is None:
                self.kafka.ssl_ca_location = self.var_dir / LOCAL_CA
            if (self.postgres.sslmode in VERIFYING_SSLMODES
                    and self.postgres.sslrootcert is None):
                self.postgres.sslrootcert = self.var_dir / LOCAL_CA
        return self

    def check_secrets(self) -> None:
        """Outside local development, refuse placeholder or short secrets and clear-text links.

        Every service calls this first in its main(); the ConfigError names
        every offending setting at once.
        """
        if self.env == "local":
            return
        problems: list[str] = []
        # Without TLS the SCRAM exchange is safe but everything after it (mail
        # content, addresses) crosses the network readable and alterable.
        if self.kafka.security_protocol != "SASL_SSL":
            problems.append(
                f"kafka.security_protocol (MAILBUS_KAFKA__SECURITY_PROTOCOL) is"
                f" {self.kafka.security_protocol}, not SASL_SSL")
        if self.uses_postgres and self.postgres.sslmode not in VERIFYING_SSLMODES:
            problems.append(
                f"postgres.sslmode (MAILBUS_POSTGRES__SSLMODE) is {self.postgres.sslmode},"
                " not verify-full or verify-ca")
        checked = [("kafka.password", self.kafka.password, self.kafka.password_file)]
        if self.uses_postgres:
            checked.append(
                ("postgres.password", self.postgres.password, self.postgres.password_file))
        for what, value, path in checked:
            secret = read_secret(value, path, what)
            if secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
                problems.append(
                    f"{what} is a placeholder or shorter than {MIN_SECRET_LENGTH} characters")
        if problems:
            raise ConfigError("; ".join(problems) + "; refusing to start in production")
