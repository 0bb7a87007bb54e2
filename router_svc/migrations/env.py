from alembic import context

from common import migrate
from router_svc import store

migrate.run_env(context, store.metadata)
