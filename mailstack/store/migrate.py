"""Schema migrations with Alembic, shipped inside the package."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mailstack.store.engine import WRITE_OPTION

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaError(Exception):
    """The database schema does not match this version of mailstack."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision id; several heads (parallel branches) are joined with '+'."""
    return "+".join(sorted(ScriptDirectory.from_config(_config()).get_heads()))


def _current(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    return "+".join(sorted(heads)) if heads else None


def _check_known(connection: Connection) -> str | None:
    revision = _current(connection)
    if revision is None:
        return None
    scripts = ScriptDirectory.from_config(_config())
    for part in revision.split("+"):
        try:
            scripts.get_revision(part)
        except CommandError:
            raise SchemaError(
                f"the database schema is at revision {part}, which this mailstack "
                f"(newest revision {head_revision()}) does not know: the database was "
                "upgraded by a newer mailstack; run that version or restore a backup"
            ) from None
    return revision


def _upgrade(connection: Connection) -> tuple[str | None, str]:
    if connection.dialect.name == "postgresql":
        # Serialise concurrent upgrades from several processes.
        connection.execute(text("SELECT pg_advisory_xact_lock(7468237)"))
    before = _check_known(connection)
    command.upgrade(_config(connection), "heads")
    return before, head_revision()


async def upgrade(engine: AsyncEngine) -> tuple[str | None, str]:
    """Apply every pending migration; return the revisions before and after.

    Raises SchemaError when the database is newer than this code.
    """
    async with engine.connect() as connection:
        await connection.execution_options(**{WRITE_OPTION: True})
        async with connection.begin():
            before, after = await connection.run_sync(_upgrade)
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, after


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_check_known)


async def check_current(engine: AsyncEngine) -> None:
    """Raise SchemaError unless the database is at this code's head revision."""
    revision = await current_revision(engine)
    head = head_revision()
    if revision is None:
        raise SchemaError(
            f"the database {engine.url.render_as_string(hide_password=True)} has no mailstack schema: "
            "check that --config names this server's configuration, or create the schema with "
            "`mailstack db upgrade`"
        )
    if revision != head:
        raise SchemaError(
            f"the database schema is at revision {revision or 'none (empty database)'}, "
            f"but this mailstack needs {head}: run `mailstack db upgrade`"
        )
