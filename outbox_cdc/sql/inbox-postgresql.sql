-- outbox-cdc inbox (consumer side) for PostgreSQL.
-- {table} is the inbox table (default outbox_cdc_inbox): one row per event a consumer processed,
-- written in the same transaction as the handler's own writes.

CREATE TABLE IF NOT EXISTS {table} (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

-- the retention purge deletes by age
CREATE INDEX IF NOT EXISTS {table_name}_processed_at ON {table} (processed_at);
