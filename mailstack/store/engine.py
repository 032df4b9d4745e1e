"""Creation of the async SQLAlchemy engine with the settings the store relies on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE, so
# a writer takes the database lock at its first statement. With a plain
# (deferred) BEGIN, a read followed by a write fails at once with SQLITE_BUSY
# when another process committed in between, and the busy timeout cannot help.
WRITE_OPTION = "mailstack_write"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, busy_timeout: float = 30.0, pool_size: int = 10) -> AsyncEngine:
    """Create the engine for ``url``; for SQLite, create its folder and set its pragmas.

    SQLite runs in WAL mode with ``synchronous=FULL`` so that a commit is on
    disk when it returns, with foreign keys enforced and a busy timeout so that
    several processes can share one file.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": busy_timeout})
        _configure_sqlite(engine, busy_timeout)
        return engine
    return create_async_engine(url, pool_size=pool_size, pool_pre_ping=True)


def _enable_wal(cursor, busy_timeout: float) -> None:
    """Switch the database to WAL mode unless it already is.

    WAL mode is stored in the file, so only the first connection to a new file
    changes it. That change needs an exclusive lock. When several connections
    open a new file together, it can fail with "database is locked", so it is
    retried until the busy timeout has passed.
    """
    cursor.execute("PRAGMA journal_mode")
    (mode,) = cursor.fetchone()
    if str(mode).lower() in ("wal", "memory"):
        return
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as exc:  # the driver's OperationalError, wrapped or not
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            log.debug("database locked while enabling WAL mode; retrying in %.3f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _configure_sqlite(engine: AsyncEngine, busy_timeout: float) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        _enable_wal(cursor, busy_timeout)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")
