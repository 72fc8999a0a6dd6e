"""Sources: where committed events come from. The contract is in
:class:`outbox_cdc.sources.base.Source`."""
