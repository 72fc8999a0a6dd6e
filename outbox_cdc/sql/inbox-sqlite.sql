-- outbox-cdc inbox (consumer side) for SQLite.
-- {table} is the inbox table (default outbox_cdc_inbox): one row per event a consumer processed,
-- written in the same transaction as the handler's own writes. Times are RFC 3339 text in UTC,
-- fixed width, so they sort like the times they hold.

CREATE TABLE IF NOT EXISTS {table} (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;

-- the retention purge deletes by age
CREATE INDEX IF NOT EXISTS {table_name}_processed_at ON {table_name} (processed_at);
