"""Alembic environment for ledger_svc (see common.migrate)."""
from alembic import context

from common import migrate
from ledger_svc import store

migrate.run_env(context, store.metadata)
