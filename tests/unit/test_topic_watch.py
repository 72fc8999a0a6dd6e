"""The partition counts the Kafka sinks remember (outbox_cdc.sinks.topics)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbox_cdc.errors import SinkError, TopicChangedError
from outbox_cdc.sinks import topics


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    topics.forget()
    yield
    topics.forget()


def test_a_topic_that_shrinks_or_disappears_is_a_non_retriable_sink_error() -> None:
    topics.check("k:9092", "orders", 3)
    topics.check("k:9092", "orders", 3)
    topics.check("k:9092", "orders", 6)  # partitions added: fine, and remembered
    assert topics.expected("k:9092", "orders") == 6
    assert topics.changed("k:9092", "orders", 3)
    assert topics.changed("k:9092", "orders", None)
    assert not topics.changed("k:9092", "other", 1)
    with pytest.raises(TopicChangedError) as shrank:
        topics.check("k:9092", "orders", 1)
    assert isinstance(shrank.value, SinkError) and not shrank.value.retriable
    message = str(shrank.value)
    assert "'orders' shrank from 6 to 1 partition " in message
    assert "--partitions 6" in message and "auto.create.topics.enable=false" in message
    assert "restart" in message
    with pytest.raises(TopicChangedError, match="'orders' disappeared"):
        topics.check("k:9092", "orders", None)
    topics.check("other:9092", "orders", 1)  # another cluster, another topic
    topics.check("k:9092", "new", None)  # never seen: nothing to compare with
