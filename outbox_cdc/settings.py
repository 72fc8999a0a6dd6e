"""Relay settings: one validated model, read from CLI flags, ``OUTBOX_CDC_*`` environment
variables and an optional TOML file (in that order of precedence).

Only the CLI builds settings; library code receives plain option objects. Secrets are
``SecretStr`` so they never print; :func:`redact_url` removes passwords from URLs in messages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from outbox_cdc.errors import ConfigurationError
from outbox_cdc.sinks.kafka import KafkaOptions
from outbox_cdc.sources.polling import DEFAULT_RETENTION, PollingSourceOptions
from outbox_cdc.sources.polling_databases import dialect_of, sqlite_path
from outbox_cdc.sources.wal import WalSourceOptions

ENV_PREFIX = "OUTBOX_CDC_"


def redact_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; also key=value DSNs."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)


class Settings(BaseSettings):
    """Every setting of ``outbox-cdc start``. Environment: ``OUTBOX_CDC_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, case_sensitive=False
    )
    config_file: ClassVar[Path | None] = None  # set by load_settings on a subclass

    # -- database --------------------------------------------------------------------------------
    database_url: SecretStr = Field(
        description="URL of the database holding the outbox: postgresql://user:password@host:5432/db"
        ", mysql://user:password@host:3306/db (also mariadb://) or sqlite:////path/to/file.db",
    )
    mode: Literal["auto", "wal", "polling"] = Field(
        "auto",
        description="wal: stream PostgreSQL's WAL (wal2json); polling: read pending rows; "
        "auto: wal for PostgreSQL, polling for MySQL/MariaDB and SQLite",
    )
    table: str | None = Field(
        None, description="outbox table (default public.outbox on PostgreSQL, else outbox)"
    )
    slot: str = Field("outbox_cdc", description="logical replication slot (wal2json)")
    create_slot: bool = Field(True, description="create the slot when it is missing")
    recover_lost_slot: bool = Field(
        True,
        description="when the slot is missing or invalidated after events were delivered "
        "(a gap), recreate it and re-publish the gap's rows from the outbox table before "
        "streaming; false: stop with an error that says to run 'outbox-cdc recover'",
    )
    message_prefix: str = Field(
        "outbox-cdc",
        description="prefix of table-less events (pg_logical_emit_message); empty to disable",
    )
    status_interval: float = Field(
        10.0, gt=0, le=300, description="seconds between status updates when idle"
    )
    replication_timeout: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="WAL: seconds without any message from the server after which the "
        "replication connection is taken for dead and reopened (a reply is asked for after "
        "half of it); 0: never",
    )

    # -- polling ---------------------------------------------------------------------------------
    poll_interval: float = Field(
        0.1, gt=0, le=60, description="polling: seconds between polls while the outbox is idle"
    )
    poll_batch_size: int = Field(
        1000, ge=1, le=50_000, description="polling: rows read and published per batch"
    )
    poll_notify: bool = Field(
        False,
        description="polling on PostgreSQL: also wake up on the NOTIFY sent by the trigger of "
        "'outbox-cdc init --polling --notify'",
    )
    retention: float = Field(
        DEFAULT_RETENTION,
        ge=0,
        description="seconds an outbox row is kept after publication before the clean-up "
        "deletes it; 0: as soon as it is published",
    )

    # -- kafka -----------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(description="host:port[,host:port...] of Kafka")
    kafka_client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python",
        description="producer library: kafka-python (pure Python) or confluent (librdkafka, "
        "needs the confluent extra)",
    )
    kafka_client_id: str = "outbox-cdc"
    kafka_linger_ms: int = Field(5, ge=0, le=60_000)
    kafka_batch_size: int = Field(64 * 1024, ge=1)
    kafka_compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    kafka_max_in_flight_requests: int = Field(5, ge=1, le=5)
    kafka_request_timeout_ms: int = Field(30_000, ge=1_000)
    kafka_delivery_timeout_ms: int = Field(120_000, ge=1_000)
    kafka_max_block_ms: int = Field(10_000, ge=100)
    kafka_max_request_size: int = Field(1024 * 1024 + 64 * 1024, ge=1024)
    kafka_create_topics: bool = True
    kafka_topic_partitions: int = Field(1, ge=1)
    kafka_topic_replication_factor: int = Field(1, ge=1)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    # -- relay -----------------------------------------------------------------------------------
    source_name: str = Field("outbox-cdc", description="CloudEvents ce_source header")
    max_in_flight_events: int = Field(20_000, ge=1)
    max_in_flight_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    dead_letter_topic: str | None = Field(
        None, description="topic for records Kafka refuses for good; unset = stop on them"
    )
    shutdown_timeout: float = Field(30.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line"
    )

    # -- exactly-once ----------------------------------------------------------------------------
    exactly_once: bool = Field(
        False,
        description="Kafka transactions, each with a progress record, so read_committed "
        "consumers see every event exactly once (docs/exactly-once.md)",
    )
    progress_topic: str = Field(
        "outbox_cdc_progress", description="exactly-once: compacted topic of progress records"
    )
    transactional_id: str | None = Field(
        None,
        description="exactly-once: Kafka transactional id; default outbox-cdc:<host>:<port>/"
        "<database>/<slot>; unique per slot on a Kafka cluster",
    )
    transaction_max_events: int = Field(
        1000, ge=1, description="exactly-once: events per Kafka transaction (at most)"
    )
    transaction_max_ms: int = Field(
        100, ge=1, description="exactly-once: milliseconds a Kafka transaction collects events"
    )

    # -- operations ------------------------------------------------------------------------------
    http_port: int | None = Field(
        None, ge=0, le=65535, description="port of /metrics, /healthz, /readyz; unset: none"
    )
    # all interfaces by default: Kubernetes probes and Prometheus come from outside the pod
    http_bind: str = Field("0.0.0.0", description="address the HTTP endpoints listen on")  # noqa: S104
    heartbeat_interval: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="WAL: seconds between heartbeat messages (never published) that keep the "
        "lag measurable while the outbox is idle; 0: none",
    )
    slot_wal_warning_bytes: int = Field(
        1024**3,
        ge=0,
        description="WAL: warn (log and metric) when the slot retains more WAL than this; 0: never",
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: SecretStr) -> SecretStr:
        try:
            dialect_of(v.get_secret_value())
        except ConfigurationError as exc:
            raise ValueError(str(exc).removeprefix("database_url: ")) from None
        return v

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {v}")
        return v

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> Settings:
        """A SASL protocol needs its mechanism and credentials; TLS files need a TLS protocol
        (else they would be ignored, and the connection be plaintext)."""
        protocol = self.kafka_security_protocol
        where = f"with kafka_security_protocol={protocol}"
        if protocol.startswith("SASL_"):
            for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"):
                value = getattr(self, name)
                if not (value.get_secret_value() if isinstance(value, SecretStr) else value):
                    flag, env = "--" + name.replace("_", "-"), ENV_PREFIX + name.upper()
                    raise ValueError(f"{name} ({flag} / {env}): is required {where}")
        elif self.kafka_sasl_mechanism is not None:
            raise ValueError(
                f"kafka_sasl_mechanism: needs kafka_security_protocol SASL_SSL or SASL_PLAINTEXT, "
                f"not {protocol}"
            )
        if not protocol.endswith("SSL"):
            for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: needs kafka_security_protocol SSL or SASL_SSL, not {protocol}"
                    )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError(
                "kafka_ssl_certfile and kafka_ssl_keyfile: give both (mutual TLS) or neither"
            )
        return self

    @model_validator(mode="after")
    def _mode_fits_database(self) -> Settings:
        dialect = self.dialect
        if self.mode == "wal" and dialect != "postgresql":
            raise ValueError(
                f"mode (--mode / OUTBOX_CDC_MODE): wal needs PostgreSQL with wal2json, but "
                f"database_url is {dialect}: use polling (or auto)"
            )
        return self

    @property
    def dialect(self) -> str:
        return dialect_of(self.database_url.get_secret_value())

    @property
    def polling(self) -> bool:
        return self.mode == "polling" or (self.mode == "auto" and self.dialect != "postgresql")

    @property
    def outbox_table(self) -> str:
        if self.table:
            return self.table
        return "public.outbox" if self.dialect == "postgresql" else "outbox"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = cls.config_file
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    # -- option objects for the library --------------------------------------------------------

    def postgres_dsn(self) -> str:
        url = self.database_url.get_secret_value()
        scheme, rest = url.split(":", 1)
        return "postgresql:" + rest if "+" in scheme else url

    def wal_source_options(self) -> WalSourceOptions:
        return WalSourceOptions(
            dsn=self.postgres_dsn(),
            slot=self.slot,
            table=self.outbox_table,
            message_prefix=self.message_prefix or None,
            create_slot=self.create_slot,
            recover_lost_slot=self.recover_lost_slot,
            status_interval=self.status_interval,
            replication_timeout=self.replication_timeout,
            heartbeat_interval=self.heartbeat_interval,
            retention=self.retention,
        )

    def polling_source_options(self) -> PollingSourceOptions:
        return PollingSourceOptions(
            url=self.database_url.get_secret_value(),
            table=self.outbox_table,
            poll_interval=self.poll_interval,
            batch_size=self.poll_batch_size,
            retention=self.retention,
            notify=self.poll_notify,
        )

    def default_transactional_id(self) -> str:
        if self.polling:
            parts = urlsplit(self.database_url.get_secret_value())
            where = (
                sqlite_path(self.database_url.get_secret_value())
                if self.dialect == "sqlite"
                else f"{parts.hostname or 'local'}:{parts.port or ''}{parts.path}"
            )
            return f"outbox-cdc:{self.dialect}:{where}/{self.outbox_table}"
        parts = urlsplit(self.postgres_dsn())
        return (
            f"outbox-cdc:{parts.hostname or 'local'}:{parts.port or 5432}"
            f"{parts.path or '/'}/{self.slot}"
        )

    def kafka_client_config(self) -> dict[str, Any]:
        """The security settings, by their kafka-python names (contains secrets)."""
        extra: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            extra["sasl_mechanism"] = self.kafka_sasl_mechanism
            extra["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                extra["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        for name in ("cafile", "certfile", "keyfile"):
            value = getattr(self, f"kafka_ssl_{name}")
            if value is not None:
                extra[f"ssl_{name}"] = str(value)
        return extra

    def kafka_options(self) -> KafkaOptions:
        return KafkaOptions(
            bootstrap_servers=self.kafka_bootstrap_servers,
            client_id=self.kafka_client_id,
            linger_ms=self.kafka_linger_ms,
            batch_size=self.kafka_batch_size,
            compression_type=self.kafka_compression_type,
            max_in_flight_requests=self.kafka_max_in_flight_requests,
            request_timeout_ms=self.kafka_request_timeout_ms,
            delivery_timeout_ms=self.kafka_delivery_timeout_ms,
            max_block_ms=self.kafka_max_block_ms,
            max_request_size=self.kafka_max_request_size,
            create_topics=self.kafka_create_topics,
            topic_partitions=self.kafka_topic_partitions,
            topic_replication_factor=self.kafka_topic_replication_factor,
            client_config=self.kafka_client_config(),
            transactional_id=(self.transactional_id or self.default_transactional_id())
            if self.exactly_once
            else None,
        )


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from flags (``overrides``, None values ignored), the environment and the
    config file. Raises ConfigurationError naming each bad setting and what is expected."""
    if config_file is not None and not config_file.is_file():
        raise ConfigurationError(f"config file {config_file} does not exist")
    cls = type("ConfiguredSettings", (Settings,), {"config_file": config_file})
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**values)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc)) from None


def kafka_security_config(config_file: Path | None = None) -> dict[str, Any]:
    """The Kafka security settings (environment, config file) by their kafka-python names, for
    a command that needs no other setting (``check``). Raises ConfigurationError."""
    settings = load_settings(
        config_file,
        database_url="sqlite:///unused",
        kafka_bootstrap_servers="unused",
        mode="polling",
    )
    return settings.kafka_client_config()


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings: its message names them
            lines.append("  " + err["msg"].removeprefix("Value error, "))
            continue
        name = ".".join(str(p) for p in err["loc"])
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "is not a known setting (check its spelling)"
        # Never echo the rejected value: it may be a password.
        lines.append(f"  {name} ({flag} / {env}): {msg}")
    return "\n".join(lines)
