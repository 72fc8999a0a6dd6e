"""The outbox DDL per database, loaded from package data (``outbox_cdc/sql``).

Each file is a list of idempotent statements (``IF NOT EXISTS``), so applying it twice changes
nothing, and its text is what ``outbox-cdc init --print-sql`` shows a DBA.
"""

from __future__ import annotations

import re
from importlib import resources

SCHEMA_VERSION = 1
DIALECTS = ("postgresql", "mysql", "sqlite")

_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE_RE = re.compile(rf"(?:{_IDENT}\.)?{_IDENT}")


def validate_table(table: str) -> str:
    from outbox_cdc.errors import ConfigurationError

    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ConfigurationError(
            f"table: {table!r} must be 'table' or 'schema.table' made of letters, digits and _"
        )
    return table


def ddl(dialect: str, table: str, *, polling: bool = False, notify: bool = False) -> str:
    """The DDL script for ``dialect`` with the outbox table name filled in. ``polling`` adds,
    on PostgreSQL, the index the polling relay reads with (MySQL and SQLite always have it);
    ``notify`` the trigger that wakes a polling relay (PostgreSQL only)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    validate_table(table)
    sql = resources.files("outbox_cdc").joinpath("sql")
    text = sql.joinpath(f"{dialect}.sql").read_text("utf-8")
    if polling and dialect == "postgresql":
        text += "\n" + sql.joinpath("postgresql-polling.sql").read_text("utf-8")
    if notify and dialect == "postgresql":
        text += "\n" + sql.joinpath("postgresql-notify.sql").read_text("utf-8")
    return text.replace("{table_name}", table.rsplit(".", 1)[-1]).replace("{table}", table)


def statements(script: str) -> list[str]:
    """Split a DDL script into statements (our files end each statement with ';' + newline and
    keep ';' out of comments and literals; a ``$$``-quoted function body is kept whole)."""
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    out: list[str] = []
    pending = ""
    for part in "\n".join(lines).split(";\n"):
        pending = f"{pending};\n{part}" if pending else part
        if pending.count("$$") % 2 == 0:  # not inside a dollar-quoted body
            out.append(pending)
            pending = ""
    if pending:
        out.append(pending)
    return [p.strip().rstrip(";") for p in out if p.strip()]
