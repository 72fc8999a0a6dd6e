-- outbox-cdc schema version 1 for MySQL 8 / MariaDB 10.6+ (polling relay).
-- {table} is the outbox table (default outbox).

CREATE TABLE IF NOT EXISTS {table} (
    seq          BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id           CHAR(36)      NOT NULL,
    created_at   DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    topic        VARCHAR(249)  NOT NULL,
    `key`        VARCHAR(1024) NULL,
    type         VARCHAR(255)  NOT NULL,
    content_type VARCHAR(255)  NOT NULL DEFAULT 'application/octet-stream',
    payload      LONGBLOB      NOT NULL,
    headers      LONGTEXT      NOT NULL,
    published_at DATETIME(6)   NULL,
    -- the polling relay's reads (pending rows in seq order) and its clean-up
    KEY pending (published_at, seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS outbox_cdc_schema (
    table_name VARCHAR(255) NOT NULL PRIMARY KEY,
    version    INT          NOT NULL,
    applied_at DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB;

INSERT IGNORE INTO outbox_cdc_schema (table_name, version) VALUES ('{table}', 1);
