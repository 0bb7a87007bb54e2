"""email keys and verification: one account per address whatever its case (and +tag), and
verification links.

Existing rows:
- email_key is computed with the rule in TOKENS_EMAIL_PLUS_TAGS (default "same"), as the
  service would have written it. Where two existing accounts share a key (ALICE@ and alice@,
  made before this), the oldest keeps it and the others get "<key>#<account id>": nobody
  loses an account, they keep logging in with their exact address, and no new signup can
  take any of those addresses again.
- Accounts that existed before verification are taken as verified, with ledger_svc already
  holding their address: failing the keys of paying customers on deploy would be worse than
  trusting the addresses they have been mailed at all along.

Revision ID: a7c3e91d5b20
Revises: 39744010e60e
Create Date: 2026-12-07 01:00:00
"""
import os

import sqlalchemy as sa
from alembic import op


revision = 'a7c3e91d5b20'
down_revision = '39744010e60e'
branch_labels = None
depends_on = None


def _email_key(email: str, plus_tags: str) -> str:
    # A frozen copy of auth_svc.domain.email_key as it is at this revision.
    local, _, domain = email.lower().rpartition("@")
    if plus_tags == "same":
        local = local.split("+", 1)[0] or local
    return f"{local}@{domain}"


def upgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_key', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('email_verified_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('ledger_email_at', sa.BigInteger(), nullable=True))

    plus_tags = os.environ.get("TOKENS_EMAIL_PLUS_TAGS", "same").strip().lower()
    conn = op.get_bind()
    accounts = sa.table('accounts', sa.column('id', sa.String), sa.column('email', sa.String),
                        sa.column('created_at', sa.BigInteger), sa.column('email_key', sa.String))
    taken: set[str] = set()
    rows = conn.execute(sa.select(accounts.c.id, accounts.c.email)
                        .order_by(accounts.c.created_at, accounts.c.id)).all()
    for account_id, email in rows:
        key = _email_key(email, plus_tags)
        if key in taken:
            key = f"{key}#{account_id}"
        taken.add(key)
        conn.execute(accounts.update().where(accounts.c.id == account_id).values(email_key=key))
    op.execute("UPDATE accounts SET email_verified_at = created_at, ledger_email_at = created_at")

    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.alter_column('email_key', existing_type=sa.String(length=300), nullable=False)
        batch_op.create_unique_constraint('uq_accounts_email_key', ['email_key'])

    op.create_table('email_verifications',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=32), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token_hash')
    )
    with op.batch_alter_table('email_verifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_email_verifications_account_id'), ['account_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('email_verifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_email_verifications_account_id'))
    op.drop_table('email_verifications')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_constraint('uq_accounts_email_key', type_='unique')
        batch_op.drop_column('ledger_email_at')
        batch_op.drop_column('email_verified_at')
        batch_op.drop_column('email_key')
