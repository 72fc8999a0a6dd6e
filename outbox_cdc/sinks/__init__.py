"""Sinks: where records go. The contract is in :class:`outbox_cdc.sinks.base.Sink`."""
