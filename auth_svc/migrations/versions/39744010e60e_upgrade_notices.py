"""upgrade notices: when an approved upgrade's email was queued with ledger_svc.

Revision ID: 39744010e60e
Revises: 65b148ff6671
Create Date: 2026-11-27 09:26:28.055897
"""
import sqlalchemy as sa
from alembic import op


revision = '39744010e60e'
down_revision = '65b148ff6671'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('upgrade_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('notified_at', sa.BigInteger(), nullable=True))
    # Requests approved before approvals were emailed are not emailed now, long after the fact.
    op.execute("UPDATE upgrade_requests SET notified_at = decided_at WHERE status = 'approved'")


def downgrade() -> None:
    with op.batch_alter_table('upgrade_requests', schema=None) as batch_op:
        batch_op.drop_column('notified_at')
