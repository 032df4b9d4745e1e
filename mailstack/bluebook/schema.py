"""Tables of the Blue Book's own database, and their creation on first use.

The database contains zones, their records in presentation format, TSIG keys and
one state row whose ``generation`` grows with every committed change, so that a
running server notices changes made by other processes with one cheap query.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mailstack.store.engine import WRITE_OPTION

SCHEMA_VERSION = 1

metadata = MetaData()

state = Table(
    "bluebook_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("schema_version", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
)

zones = Table(
    "bluebook_zones",
    metadata,
    Column("id", Integer, primary_key=True),
    # Absolute, lower-case, with the trailing dot: "here.test."
    Column("name", String(255), nullable=False, unique=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

records = Table(
    "bluebook_records",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("zone_id", Integer, ForeignKey("bluebook_zones.id", ondelete="CASCADE"), nullable=False, index=True),
    # Absolute, lower-case owner name with the trailing dot.
    Column("name", String(255), nullable=False),
    Column("rdtype", Integer, nullable=False),
    Column("ttl", Integer, nullable=False),
    # Presentation format with absolute names, as dnspython writes it.
    Column("rdata", Text, nullable=False),
)

tsig_keys = Table(
    "bluebook_tsig_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("algorithm", String(32), nullable=False),
    Column("secret", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", name="uq_bluebook_tsig_keys_name"),
)


class SchemaMismatch(Exception):
    """The database was made by another program or another version of the Blue Book."""


async def ensure_schema(engine: AsyncEngine) -> None:
    """Create the tables in an empty database, or check the version of an existing one.

    Tables are created only when none of them exists yet, so an existing
    database is never altered behind the operator's back.
    """
    async with engine.connect() as connection:
        # BEGIN IMMEDIATE on SQLite: two processes opening a new database at
        # once take turns, so only the first creates the tables.
        connection = await connection.execution_options(**{WRITE_OPTION: True})
        async with connection.begin():
            await _create_or_check(connection)


async def _create_or_check(connection: AsyncConnection) -> None:
    existing = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    ours = set(metadata.tables)
    if not existing & ours:
        await connection.run_sync(metadata.create_all)
        await connection.execute(state.insert().values(id=1, schema_version=SCHEMA_VERSION, generation=0))
        return
    missing = ours - existing
    if missing:
        raise SchemaMismatch(f"the Blue Book database lacks the tables {', '.join(sorted(missing))}")
    version = (await connection.execute(select(state.c.schema_version).where(state.c.id == 1))).scalar()
    if version != SCHEMA_VERSION:
        raise SchemaMismatch(
            f"the Blue Book database has schema version {version}, this program expects {SCHEMA_VERSION}"
        )
