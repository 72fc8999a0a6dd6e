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

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from outbox_cdc.errors import ConfigurationError
from outbox_cdc.sinks.kafka import KafkaOptions
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
        description="PostgreSQL URL of the database holding the outbox "
        "(postgresql://user:password@host:5432/db)",
    )
    table: str = Field("public.outbox", description="outbox table, schema-qualified")
    slot: str = Field("outbox_cdc", description="logical replication slot (wal2json)")
    create_slot: bool = Field(True, description="create the slot when it is missing")
    message_prefix: str = Field(
        "outbox-cdc",
        description="prefix of table-less events (pg_logical_emit_message); empty to disable",
    )
    status_interval: float = Field(
        10.0, gt=0, le=300, description="seconds between status updates when idle"
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

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        scheme = url.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"scheme {scheme!r} is not supported by the WAL relay: use "
                "postgresql://user:password@host:port/dbname"
            )
        return v

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
            table=self.table,
            message_prefix=self.message_prefix or None,
            create_slot=self.create_slot,
            status_interval=self.status_interval,
        )

    def kafka_options(self) -> KafkaOptions:
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
            client_config=extra,
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


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "?"
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
