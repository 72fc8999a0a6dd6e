-- outbox-cdc inbox (consumer side) for MySQL/MariaDB (InnoDB).
-- {table} is the inbox table (default outbox_cdc_inbox): one row per event a consumer processed,
-- written in the same transaction as the handler's own writes. Times are UTC. The binary
-- collation compares ids byte for byte (two ids differing only in case are two events).

CREATE TABLE IF NOT EXISTS {table} (
    consumer     VARCHAR(255) NOT NULL,
    event_id     VARCHAR(255) NOT NULL,
    processed_at DATETIME(6)  NOT NULL,
    PRIMARY KEY (consumer, event_id),
    KEY {table_name}_processed_at (processed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
