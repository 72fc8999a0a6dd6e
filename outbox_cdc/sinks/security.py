"""Why a Kafka connection failed, in words that name the setting to fix, without a secret.

kafka-python gives up bootstrapping with ``KafkaTimeoutError: Unable to bootstrap from ...``
whatever the cause: a wrong SASL password and a CA that did not sign the broker's certificate
only show in its log (``kafka.net.manager``), which the CLI silences. :func:`kafka_python_failures`
records those log lines while a client connects, so the error can say what went wrong.
librdkafka (confluent-kafka) reports the cause in its error callback; both go through
:func:`security_hint`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

_MANAGER = "kafka.net.manager"  # kafka-python 3: logs each failed (bootstrap) connection
_FAILURE = re.compile(
    r"^(?:Bootstrap connection to \S+ failed|Connection failed|Bootstrap attempt to \S+ failed)"
    r": (?P<why>.*?)(?: \(backoff [\d.]+ secs\))?$",
    re.DOTALL,
)
_SECRET_KEYS = ("sasl_plain_password", "sasl.password", "ssl_password", "ssl.key.password")

_lock = threading.Lock()
_windows = 0
_saved: tuple[int, int, bool] = (logging.NOTSET, logging.NOTSET, True)  # effective, own, propagate


def secrets_of(client_config: Mapping[str, Any]) -> list[str]:
    """The secret values of a client configuration (kafka-python or librdkafka names)."""
    return [str(v) for k, v in client_config.items() if k in _SECRET_KEYS and v]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (no client prints one: defence in depth)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


_SASL_HINT = (
    "check kafka_sasl_username and kafka_sasl_password (OUTBOX_CDC_KAFKA_SASL_USERNAME, "
    "OUTBOX_CDC_KAFKA_SASL_PASSWORD) and kafka_sasl_mechanism"
)


def security_hint(why: str, protocol: str | None = None) -> str:
    """The settings to check for a connection failure described by ``why`` ('' if none fits);
    ``protocol``: the kafka_security_protocol in use."""
    # librdkafka names the broker sasl_ssl://host:port in every message: match causes only
    low = why.lower()
    if "certificate" in low or "handshake" in low:
        return (
            "check kafka_ssl_cafile (OUTBOX_CDC_KAFKA_SSL_CAFILE): it must hold the CA that "
            "signed the brokers' certificates, whose names must match the advertised host names; "
            "and kafka_security_protocol"
        )
    if "authenticat" in low:
        return _SASL_HINT
    if "disconnected" in low and (protocol or "").startswith("SASL_"):
        # kafka-python with PLAIN: the broker just closes the connection on a wrong password
        return f"the broker closed the connection during {protocol} authentication: {_SASL_HINT}"
    return ""


def describe_failure(why: str | None, client_config: Mapping[str, Any]) -> str:
    """`` (last error: ...; check ...)`` for an error message, or '' when nothing is known."""
    if not why:
        return ""
    why = scrub(" ".join(why.split()), secrets_of(client_config))
    protocol = client_config.get("security_protocol") or client_config.get("security.protocol")
    hint = security_hint(why, str(protocol) if protocol else None)
    return f" (last error: {why}" + (f"; {hint})" if hint else ")")


class FailureLog(logging.Handler):
    """The last connection failure kafka-python logged while the window was open."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None
        # the last one that names a cause (a refused password, an unverified certificate): a
        # timeout that cut the next attempt short must not hide it
        self.telling: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            m = _FAILURE.match(record.getMessage())
        except Exception:  # a logging record must never break the client
            return
        if m:
            self.last = m.group("why").strip()
            if security_hint(self.last) and "timed out" not in self.last.lower():
                self.telling = self.last

    def describe(self, client_config: Mapping[str, Any]) -> str:
        return describe_failure(self.telling or self.last, client_config)


class _Forward(logging.Filter):
    """Passes on to the parent loggers what they would have received without the window."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _saved[2] and record.levelno >= _saved[0]:
            logging.getLogger(_MANAGER.rsplit(".", 1)[0]).handle(record)
        return True


_forward = _Forward()


@contextmanager
def kafka_python_failures() -> Iterator[FailureLog]:
    """While open, kafka-python's connection failures are recorded (``.last``, ``.describe``),
    even when the ``kafka`` logger is silenced; what the parent loggers would have received
    still reaches them. Windows may overlap (threads): the logger is restored by the last."""
    global _windows, _saved
    logger = logging.getLogger(_MANAGER)
    with _lock:
        if _windows == 0:
            _saved = (logger.getEffectiveLevel(), logger.level, logger.propagate)
            logger.setLevel(min(_saved[0], logging.WARNING))
            logger.propagate = False
            logger.addFilter(_forward)
        _windows += 1
        handler = FailureLog()
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        with _lock:
            logger.removeHandler(handler)
            _windows -= 1
            if _windows == 0:
                logger.removeFilter(_forward)
                logger.setLevel(_saved[1])
                logger.propagate = _saved[2]
