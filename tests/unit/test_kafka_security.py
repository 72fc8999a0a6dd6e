"""Kafka security: the settings' consistency rules, and connection failures naming the setting
to fix without a secret (outbox_cdc.sinks.security). The real brokers: test_tls.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from outbox_cdc.errors import ConfigurationError
from outbox_cdc.settings import load_settings
from outbox_cdc.sinks.security import (
    describe_failure,
    kafka_python_failures,
    security_hint,
)

URL = "postgresql://u:p@localhost/db"
SASL = {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512"}


def settings(monkeypatch: pytest.MonkeyPatch, **values: object) -> dict[str, object]:
    for name in list(os.environ):
        if name.startswith("OUTBOX_CDC_"):
            monkeypatch.delenv(name)
    s = load_settings(None, database_url=URL, kafka_bootstrap_servers="b:9095", **values)
    return s.kafka_client_config()


def test_sasl_ssl_settings_become_client_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    config = settings(
        monkeypatch,
        **SASL,
        kafka_sasl_username="relay",
        kafka_sasl_password="pw-1",
        kafka_ssl_cafile=str(ca),
    )
    assert config == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "relay",
        "sasl_plain_password": "pw-1",
        "ssl_cafile": str(ca),
    }


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_mechanism"),
        ({**SASL, "kafka_sasl_username": "u"}, "kafka_sasl_password"),
        ({**SASL, "kafka_sasl_password": "pw-2"}, "kafka_sasl_username"),
        ({"kafka_sasl_mechanism": "PLAIN"}, "kafka_sasl_mechanism: needs"),
        ({"kafka_ssl_cafile": "CA"}, "kafka_ssl_cafile: needs kafka_security_protocol SSL"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_certfile": "CA"}, "kafka_ssl_keyfile"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent"}, "no such file"),
    ],
)
def test_inconsistent_security_settings_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, values: dict[str, str], named: str
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    values = {k: str(ca) if v == "CA" else v for k, v in values.items()}
    with pytest.raises(ConfigurationError, match=named) as err:
        settings(monkeypatch, **values)
    assert "pw-2" not in str(err.value)


@pytest.mark.parametrize(
    ("why", "setting"),
    [
        # kafka-python
        (
            "[Error 58] SaslAuthenticationFailedError: Authentication failed during "
            "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            "kafka_sasl_password",
        ),
        (
            "KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            "verify failed: unable to get local issuer certificate (_ssl.c:1006)",
            "kafka_ssl_cafile",
        ),
        # librdkafka: every message names the broker sasl_ssl://...
        (
            "_AUTHENTICATION: sasl_ssl://127.0.0.1:9095/bootstrap: SASL authentication error: "
            "Authentication failed during authentication due to invalid credentials",
            "kafka_sasl_password",
        ),
        (
            "_TRANSPORT: sasl_ssl://127.0.0.1:9095/bootstrap: error:0A000086:SSL routines::"
            "certificate verify failed (after 6ms in state SSL_HANDSHAKE)",
            "kafka_ssl_cafile",
        ),
    ],
)
def test_a_failure_names_the_setting_to_fix(why: str, setting: str) -> None:
    assert setting in security_hint(why)
    other = {"kafka_sasl_password": "kafka_ssl_cafile", "kafka_ssl_cafile": "kafka_sasl_password"}
    assert other[setting] not in security_hint(why)


def test_plain_disconnection_names_the_sasl_settings_only_with_sasl() -> None:
    why = "KafkaConnectionError: socket disconnected"
    assert "kafka_sasl_password" in security_hint(why, "SASL_SSL")
    assert security_hint(why, "SSL") == ""


def test_a_secret_in_a_reason_is_scrubbed() -> None:
    text = describe_failure(
        "Authentication failed for s3cret-pw", {"sasl_plain_password": "s3cret-pw"}
    )
    assert "s3cret-pw" not in text and "***" in text and "kafka_sasl_password" in text


def test_kafka_python_failures_are_recorded_while_silenced_and_logging_restored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = logging.getLogger("kafka.net.manager")
    kafka = logging.getLogger("kafka")
    old = kafka.level
    kafka.setLevel(logging.CRITICAL)  # as the CLI does
    try:
        before = (manager.level, manager.propagate)
        with caplog.at_level(logging.DEBUG), kafka_python_failures() as failures:
            manager.warning(
                "Bootstrap connection to bootstrap-0 failed: %s (backoff 0.04 secs)",
                "KafkaConnectionError: Handshake failed: certificate verify failed",
            )
            manager.warning(
                "Bootstrap connection to bootstrap-0 failed: %s (backoff 0.09 secs)",
                "KafkaTimeoutError: SASL Authentication timed out",
            )
        assert failures.last == "KafkaTimeoutError: SASL Authentication timed out"
        # the cause, not the timeout that cut the next attempt short
        assert "kafka_ssl_cafile" in failures.describe({})
        assert not [r for r in caplog.records if r.name.startswith("kafka")]  # still silenced
        assert (manager.level, manager.propagate) == before
    finally:
        kafka.setLevel(old)
