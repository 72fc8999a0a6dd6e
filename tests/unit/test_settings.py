"""Settings: precedence, validation messages that name the setting, and no secret in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_cdc.errors import ConfigurationError
from outbox_cdc.settings import Settings, load_settings, redact_url

DOCS = Path(__file__).parents[2] / "docs" / "settings.md"
URL = "postgresql://relay:s3cr3t-pw@db.example:5432/shop"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(__import__("os").environ):
        if name.startswith("OUTBOX_CDC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OUTBOX_CDC_DATABASE_URL", URL)
    monkeypatch.setenv("OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    return monkeypatch


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for name in Settings.model_fields:
        assert f"`{name}`" in text and f"OUTBOX_CDC_{name.upper()}" in text, name


def test_flags_override_environment_which_overrides_the_file(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('slot = "from_file"\ntable = "app.events"\nkafka_linger_ms = 50\n')
    env.setenv("OUTBOX_CDC_SLOT", "from_env")
    s = load_settings(config, slot=None, kafka_linger_ms=7)
    assert (s.slot, s.table, s.kafka_linger_ms) == ("from_env", "app.events", 7)
    assert s.wal_source_options().table == "app.events"
    assert s.kafka_options().bootstrap_servers == "k1:9092,k2:9092"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        (
            "OUTBOX_CDC_KAFKA_LINGER_MS",
            "abc",
            "kafka_linger_ms (--kafka-linger-ms / OUTBOX_CDC_KAFKA_LINGER_MS)",
        ),
        ("OUTBOX_CDC_KAFKA_MAX_IN_FLIGHT_REQUESTS", "9", "kafka_max_in_flight_requests"),
        ("OUTBOX_CDC_DATABASE_URL", "oracle://u:s3cr3t-pw@h/db", "database_url"),
        ("OUTBOX_CDC_RETENTION", "-1", "retention (--retention / OUTBOX_CDC_RETENTION)"),
        ("OUTBOX_CDC_POLL_BATCH_SIZE", "0", "poll_batch_size"),
    ],
)
def test_invalid_settings_name_the_setting_and_hide_the_value(
    env: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    env.setenv(var, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings(None)
    assert expected in str(info.value)
    assert "s3cr3t-pw" not in str(info.value)


def test_wal_mode_with_a_database_without_logical_decoding_is_refused(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("OUTBOX_CDC_DATABASE_URL", "mysql://u:s3cr3t-pw@h/db")
    env.setenv("OUTBOX_CDC_MODE", "wal")
    with pytest.raises(ConfigurationError) as info:
        load_settings(None)
    message = str(info.value)
    assert "mode (--mode / OUTBOX_CDC_MODE): wal needs PostgreSQL" in message
    assert "use polling" in message
    assert "s3cr3t-pw" not in message


@pytest.mark.parametrize(
    ("url", "mode", "polling", "table"),
    [
        ("postgresql://u:p@h/db", None, False, "public.outbox"),
        ("postgresql://u:p@h/db", "polling", True, "public.outbox"),
        ("mysql://u:p@h/db", None, True, "outbox"),
        ("mariadb://u:p@h/db", "polling", True, "outbox"),
        ("sqlite:////var/lib/app.db", None, True, "outbox"),
    ],
)
def test_mode_auto_polls_every_database_but_postgresql(
    env: pytest.MonkeyPatch, url: str, mode: str | None, polling: bool, table: str
) -> None:
    env.setenv("OUTBOX_CDC_DATABASE_URL", url)
    s = load_settings(None, mode=mode)
    assert s.polling is polling
    assert s.outbox_table == table
    if polling:
        opts = s.polling_source_options()
        assert (opts.table, opts.url, opts.batch_size, opts.retention) == (
            table,
            url,
            1000,
            7 * 24 * 3600,
        )
        assert "p@" not in repr(opts)


def test_missing_required_settings_are_listed(env: pytest.MonkeyPatch) -> None:
    env.delenv("OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS")
    with pytest.raises(ConfigurationError, match=r"kafka_bootstrap_servers .* is required"):
        load_settings(None)


def test_unknown_keys_in_the_config_file_are_errors(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("kafka_lingr_ms = 5\n")
    with pytest.raises(ConfigurationError, match=r"kafka_lingr_ms.*not a known setting"):
        load_settings(config)


def test_secrets_do_not_print(env: pytest.MonkeyPatch) -> None:
    env.setenv("OUTBOX_CDC_KAFKA_SASL_PASSWORD", "kafka-s3cr3t")
    s = load_settings(None)
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s.model_dump())
    assert s.postgres_dsn() == URL


def test_sqlalchemy_style_url_is_accepted(env: pytest.MonkeyPatch) -> None:
    env.setenv("OUTBOX_CDC_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    assert load_settings(None).postgres_dsn() == "postgresql://u:p@h/db"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (URL, "postgresql://relay:***@db.example:5432/shop"),
        ("host=h password=s3cr3t-pw user=u", "host=h password=*** user=u"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_kafka_client_picks_the_sink_class(env: pytest.MonkeyPatch) -> None:
    from outbox_cdc.cli import _sink_class
    from outbox_cdc.sinks.kafka import KafkaSink

    assert load_settings(None).kafka_client == "kafka-python"
    assert _sink_class(load_settings(None).kafka_client) is KafkaSink
    env.setenv("OUTBOX_CDC_KAFKA_CLIENT", "confluent")
    assert load_settings(None).kafka_client == "confluent"
    env.setenv("OUTBOX_CDC_KAFKA_CLIENT", "librdkafka")
    with pytest.raises(ConfigurationError, match="kafka_client"):
        load_settings(None)


def test_kafka_client_confluent_without_the_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from outbox_cdc.cli import _sink_class

    # as if confluent-kafka were not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    monkeypatch.delitem(sys.modules, "outbox_cdc.sinks.confluent", raising=False)
    with pytest.raises(ConfigurationError) as info:
        _sink_class("confluent")
    assert str(info.value) == (
        "kafka_client=confluent needs the confluent extra: pip install 'outbox-cdc[confluent]'"
    )
