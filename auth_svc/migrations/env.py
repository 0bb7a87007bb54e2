from alembic import context

from auth_svc import store
from common import migrate

migrate.run_env(context, store.metadata)
