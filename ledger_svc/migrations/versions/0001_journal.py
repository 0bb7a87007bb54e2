"""The journal: accounts, transfers, holds, prices, usage and the two outboxes.

Revision ID: 0001_journal
Revises:
Create Date: 2025-11-27
"""
import time

import sqlalchemy as sa
from alembic import op

revision = "0001_journal"
down_revision = None
branch_labels = None
depends_on = None

UNITS = ("input_tokens", "output_tokens", "images", "video_ms", "characters", "audio_ms")
SYSTEM_ACCOUNTS = ("sys:adjustments", "sys:grants", "sys:payments", "sys:revenue")
_PK_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _units() -> list[sa.Column]:
    return [sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in UNITS]


def _outbox(name: str, *columns: sa.Column) -> None:
    op.create_table(
        name,
        sa.Column("id", _PK_BIGINT, primary_key=True, autoincrement=True),
        *columns,
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("claim", sa.String(32), nullable=False, server_default=""),
        sa.Column("last_error", sa.String(500), nullable=False, server_default=""),
        sa.Column("done_ms", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index(f"ix_{name}_due", name, ["status", "next_attempt_ms"])


def upgrade() -> None:
    accounts = op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("email", sa.String(320), nullable=False, server_default=""),
        sa.Column("debits_pending", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("debits_posted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("credits_pending", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("credits_posted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("low_notified", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("zero_notified", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ledger_transfers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("debit_account_id", sa.String(128), sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("credit_account_id", sa.String(128), sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger, nullable=False),
        sa.Column("pending_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("reason", sa.String(500), nullable=False, server_default=""),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ledger_holds",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("prices", sa.String(1000), nullable=False),
        sa.Column("price_version", sa.Integer, nullable=False),
        sa.Column("amount_nanos", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        *_units(),
        sa.Column("settled_request_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("ended_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_nanos", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("settled_ms", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index("ix_ledger_holds_pending_expiry", "ledger_holds", ["expires_ms"],
                    postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))
    op.create_table(
        "ledger_prices",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("unit", sa.String(64), primary_key=True),
        sa.Column("price_nanos", sa.BigInteger, nullable=False),
        sa.Column("effective_from_s", sa.BigInteger, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ledger_usage",
        sa.Column("id", _PK_BIGINT, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("hold_id", sa.String(64), nullable=False, unique=True),
        sa.Column("request_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("key_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        *_units(),
        sa.Column("cost_nanos", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    op.create_index("ix_ledger_usage_account_id", "ledger_usage", ["account_id", "id"])
    op.create_index("ix_ledger_usage_account_created", "ledger_usage", ["account_id", "created_ms"])
    _outbox("ledger_email_outbox",
            sa.Column("account_id", sa.String(128), nullable=False),
            sa.Column("to_addr", sa.String(320), nullable=False),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("balance_nanos", sa.BigInteger, nullable=False))
    _outbox("ledger_lago_outbox",
            sa.Column("transaction_id", sa.String(200), nullable=False),
            sa.Column("account_id", sa.String(128), nullable=False),
            sa.Column("event_ms", sa.BigInteger, nullable=False),
            sa.Column("cost_nanos", sa.BigInteger, nullable=False),
            sa.Column("properties", sa.Text, nullable=False))
    now_ms = int(time.time() * 1000)
    op.bulk_insert(accounts, [{"id": account_id, "kind": "system", "created_ms": now_ms}
                              for account_id in SYSTEM_ACCOUNTS])


def downgrade() -> None:
    for name in ("ledger_lago_outbox", "ledger_email_outbox", "ledger_usage", "ledger_prices", "ledger_holds",
                 "ledger_transfers", "ledger_accounts"):
        op.drop_table(name)
