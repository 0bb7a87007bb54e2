"""Writes a new Alembic revision for a service by comparing its tables with an
empty (or migrated) database: `./dev admin makemigration SERVICE MESSAGE`."""
import asyncio
import tempfile

from alembic import command

from common import migrate


def make(service: str, message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/scratch.db"
        asyncio.run(migrate.upgrade(service, url))
        command.revision(migrate.config(service, url), message=message, autogenerate=True)
