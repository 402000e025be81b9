"""A real PostgreSQL server for the tests, started and stopped by them.

The server comes from pip: ``pgserver`` (in the ``test`` extra) ships PostgreSQL's own
binaries in a wheel. It runs in a temporary folder and listens on a Unix socket only;
run as root, pgserver runs it as a system user ``pgserver`` that it creates once
(PostgreSQL refuses to run as root). ``MULTIDROP_TEST_POSTGRES=postgresql+psycopg://...``
uses a server of your own instead (each test makes its own database there).

Example:
    >>> with server() as url:
    ...     storage = database(url, "mine")   # a fresh, empty database on it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings

import pytest


@contextlib.contextmanager
def server():
    """Yield the URL of a running PostgreSQL server; stop it and remove its files after."""
    own = os.environ.get("MULTIDROP_TEST_POSTGRES")
    if own:
        yield own
        return
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        pytest.fail(
            "no PostgreSQL: pip install pgserver (in the test extra), or set "
            "MULTIDROP_TEST_POSTGRES to a server's URL"
        )
    folder = tempfile.mkdtemp(prefix="multidrop-postgres-")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                postgres = pgserver.get_server(folder, cleanup_mode="stop")
        except Exception as error:
            pytest.fail(f"pgserver is installed but could not start PostgreSQL: {error!r}")
        try:
            yield postgres.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        finally:
            postgres.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sql(url: str, *statements: str) -> None:
    """Run statements on ``url`` outside a transaction (CREATE DATABASE needs that)."""
    import psycopg
    import sqlalchemy

    address = sqlalchemy.engine.make_url(url).set(drivername="postgresql")
    with psycopg.connect(address.render_as_string(hide_password=False), autocommit=True) as db:
        for statement in statements:
            db.execute(statement)


def database(url: str, name: str, owner: str = "postgres") -> str:
    """A new, empty database ``name`` on the server at ``url``; its URL."""
    import sqlalchemy

    sql(url, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} OWNER {owner}")
    return sqlalchemy.engine.make_url(url).set(database=name).render_as_string(False)
