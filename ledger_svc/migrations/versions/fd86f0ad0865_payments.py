"""payments: Stripe customers, top-ups (with the tier upgrade each first one owes), and
billing's emails in the email outbox (their details and a dedupe key).

Revision ID: fd86f0ad0865
Revises: 0001_journal
Create Date: 2026-11-27 09:25:06.685677
"""
import sqlalchemy as sa
from alembic import op


revision = 'fd86f0ad0865'
down_revision = '0001_journal'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('billing_customers',
    sa.Column('account_id', sa.String(length=128), nullable=False),
    sa.Column('customer_id', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['ledger_accounts.id'], ),
    sa.PrimaryKeyConstraint('account_id'),
    sa.UniqueConstraint('customer_id')
    )
    op.create_table('billing_topups',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('account_id', sa.String(length=128), nullable=False),
    sa.Column('amount_nanos', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('payment_method', sa.String(length=64), nullable=False),
    sa.Column('card_brand', sa.String(length=32), server_default='', nullable=False),
    sa.Column('card_last4', sa.String(length=4), server_default='', nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('failure_message', sa.String(length=500), server_default='', nullable=False),
    sa.Column('payment_intent_id', sa.String(length=64), nullable=True),
    sa.Column('client_secret', sa.String(length=200), server_default='', nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('credited_ms', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('tier_status', sa.String(length=16), server_default='', nullable=False),
    sa.Column('tier_attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('tier_next_attempt_ms', sa.BigInteger(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['ledger_accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('payment_intent_id')
    )
    with op.batch_alter_table('billing_topups', schema=None) as batch_op:
        batch_op.create_index('ix_billing_topups_account', ['account_id', 'created_ms'], unique=False)
        batch_op.create_index('ix_billing_topups_tier', ['tier_status', 'tier_next_attempt_ms'], unique=False)

    with op.batch_alter_table('ledger_email_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('details', sa.Text(), server_default='', nullable=False))
        batch_op.add_column(sa.Column('dedupe_key', sa.String(length=200), nullable=True))
        batch_op.create_index('ux_ledger_email_outbox_dedupe_key', ['dedupe_key'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('ledger_email_outbox', schema=None) as batch_op:
        batch_op.drop_index('ux_ledger_email_outbox_dedupe_key')
        batch_op.drop_column('dedupe_key')
        batch_op.drop_column('details')

    with op.batch_alter_table('billing_topups', schema=None) as batch_op:
        batch_op.drop_index('ix_billing_topups_tier')
        batch_op.drop_index('ix_billing_topups_account')

    op.drop_table('billing_topups')
    op.drop_table('billing_customers')
