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


def ddl(dialect: str, table: str) -> str:
    """The DDL script for ``dialect`` with the outbox table name filled in."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    validate_table(table)
    text = resources.files("outbox_cdc").joinpath("sql", f"{dialect}.sql").read_text("utf-8")
    return text.replace("{table}", table)


def statements(script: str) -> list[str]:
    """Split a DDL script into statements (our files end each statement with ';' + newline and
    keep ';' out of comments and literals)."""
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    parts = "\n".join(lines).split(";\n")
    return [p.strip().rstrip(";") for p in parts if p.strip()]
