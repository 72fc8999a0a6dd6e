-- outbox-cdc schema version 1 for SQLite (polling relay).
-- {table} is the outbox table (default outbox). Times are RFC 3339 text in UTC.

CREATE TABLE IF NOT EXISTS {table} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL,
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    topic        TEXT    NOT NULL,
    "key"        TEXT,
    type         TEXT    NOT NULL,
    content_type TEXT    NOT NULL DEFAULT 'application/octet-stream',
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '{}',
    published_at TEXT
);

-- the polling relay reads pending rows in seq order through this index
CREATE INDEX IF NOT EXISTS {table_name}_pending ON {table_name} (seq) WHERE published_at IS NULL;

CREATE TABLE IF NOT EXISTS outbox_cdc_schema (
    table_name TEXT    PRIMARY KEY,
    version    INTEGER NOT NULL,
    applied_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

INSERT OR IGNORE INTO outbox_cdc_schema (table_name, version) VALUES ('{table}', 1);
