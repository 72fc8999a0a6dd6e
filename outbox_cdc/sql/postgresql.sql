-- outbox-cdc schema version 1 for PostgreSQL (both the WAL relay and the polling relay).
-- {table} is the outbox table, schema-qualified (default public.outbox).

CREATE TABLE IF NOT EXISTS {table} (
    -- order of insertion; the polling relay reads in this order
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- event id: the CloudEvents ce_id header, for consumers to detect duplicates
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- when the event was written (CloudEvents ce_time)
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Kafka topic the event goes to
    topic        text        NOT NULL,
    -- Kafka record key (UTF-8); events of one key keep their order; NULL = no key
    "key"        text,
    -- event type (CloudEvents ce_type), e.g. order.created
    type         text        NOT NULL,
    -- media type of the payload (content-type header)
    content_type text        NOT NULL DEFAULT 'application/octet-stream',
    -- the Kafka record value, byte for byte
    payload      bytea       NOT NULL,
    -- extra Kafka headers: a JSON object of name -> string (or {"base64": ...} for bytes).
    -- json, not jsonb: jsonb re-orders object keys, and Kafka headers keep the given order
    headers      json        NOT NULL DEFAULT '{}'::json,
    -- set by the polling relay once Kafka acknowledged the event; unused by the WAL relay
    published_at timestamptz
);

-- The top-level transaction id of the writing transaction (txid_current() is the top-level
-- id even inside a savepoint; xmin would be the subtransaction's). After a lost or dropped
-- slot the WAL relay compares it with two snapshots to re-publish exactly the rows of the
-- transactions it never delivered (docs/operations.md, "A lost or dropped slot"). Added in two
-- steps so that existing rows keep NULL and the table is not rewritten.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS txid bigint;
ALTER TABLE {table} ALTER COLUMN txid SET DEFAULT txid_current();

-- The WAL relay's durable record of the last delivered commit (fewer duplicates after restarts).
CREATE TABLE IF NOT EXISTS outbox_cdc_offsets (
    slot_name     text        PRIMARY KEY,
    delivered_lsn pg_lsn      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- commit time of the last transaction confirmed with it: where 'outbox-cdc recover' starts
-- re-publishing after a lost slot
ALTER TABLE outbox_cdc_offsets ADD COLUMN IF NOT EXISTS delivered_commit_time timestamptz;
-- a txid_snapshot every transaction visible in which is delivered (taken at a record, kept
-- once the confirmed position passed the WAL insert position of that moment)
ALTER TABLE outbox_cdc_offsets ADD COLUMN IF NOT EXISTS delivered_snapshot text;
-- the last slot recreated over a gap: state creating | backfilling | done, positions, counts
ALTER TABLE outbox_cdc_offsets ADD COLUMN IF NOT EXISTS slot_gap jsonb;

-- Which schema version each outbox table has, so later versions can migrate in place.
CREATE TABLE IF NOT EXISTS outbox_cdc_schema (
    table_name text        PRIMARY KEY,
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox_cdc_schema (table_name, version) VALUES ('{table}', 1)
    ON CONFLICT (table_name) DO NOTHING;
