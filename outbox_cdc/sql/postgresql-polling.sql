-- outbox-cdc: the index the polling relay reads pending rows with (PostgreSQL in polling mode).
-- Not needed by the WAL relay, whose rows are never marked: there it would only slow INSERTs.
-- {table} is the outbox table, schema-qualified; {table_name} its name without the schema.

CREATE INDEX IF NOT EXISTS {table_name}_pending ON {table} (seq) WHERE published_at IS NULL;
