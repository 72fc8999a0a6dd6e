-- outbox-cdc: wake the polling relay at once after each INSERT into the outbox (optional,
-- PostgreSQL polling mode with poll_notify = true). One NOTIFY per INSERT statement, carrying
-- the table's name; the relay LISTENs on channel outbox_cdc and still polls every poll_interval.
-- Cost: NOTIFY takes a database-wide lock while the transaction commits, so concurrent
-- committing producers queue behind each other for that moment. Measure before enabling it.

CREATE OR REPLACE FUNCTION outbox_cdc_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_cdc', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER {table_name}_notify AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_cdc_notify();
