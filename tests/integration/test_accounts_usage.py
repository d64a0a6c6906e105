"""`mailbus accounts list`: the sender's ledger counts, per account, for this namespace only.

Ledger rows are written with the owner role as the sender would have left
them (tests/integration/test_ledger_retention.py); the counts are read with
the admin role, as the CLI does, on the real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from mailbus.cli import app
from mailbus.sender.usage import usage
from mailbus.settings import ServiceSettings
from tests.integration.test_ledger_retention import ROWS, insert, owner
from tests.support.kafka import new_prefix


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two ledger namespaces of their own; their rows removed after."""
    mine, other = new_prefix(), new_prefix()
    yield mine, other
    with owner() as conn:
        conn.execute("DELETE FROM send_ledger WHERE namespace = ANY(%s)", ([mine, other],))


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ServiceSettings(service_name="admin").postgres.conninfo())


def test_usage_counts_the_last_day_s_sends_and_the_queue_per_account(
        namespaces: tuple[str, str]) -> None:
    mine, other = namespaces
    with owner() as conn:
        insert(conn, mine, "dev")
        insert(conn, mine, "spare", {"recent_sent": ROWS["recent_sent"]})
        insert(conn, other, "dev")  # another installation's rows are not counted
    with admin() as conn:
        counts = usage(conn, mine)
    # dev: recent_sent and edge_sent within 24 h; old_queued and partly_sent queued.
    assert counts.sent_last_day == {"dev": 2, "spare": 1}
    assert counts.queued == {"dev": 2}
    with admin() as conn:
        assert usage(conn, new_prefix()).sent_last_day == {}


def test_accounts_list_shows_used_left_and_queued(namespaces: tuple[str, str],
                                                   tmp_path: Path) -> None:
    mine, _ = namespaces
    with owner() as conn:
        insert(conn, mine, "dev")
    accounts = tmp_path / "accounts.toml"
    accounts.write_text('[[accounts]]\nid = "dev"\nkind = "smtp"\nfrom_address = "a@example.com"\n'
                        'daily_quota = 10\n[accounts.smtp]\nhost = "127.0.0.1"\nport = 2525\n')
    result = CliRunner().invoke(app, ["accounts", "list"], env={
        "COLUMNS": "200", "MAILBUS_ACCOUNTS_FILE": str(accounts),
        "MAILBUS_KAFKA__TOPIC_PREFIX": mine})
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if " dev " in line]
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    # account, kind, from, pools, quota/24h, used, left, queued, rate/s
    assert cells[0] == "dev" and cells[4:8] == ["10", "2", "8", "2"], row
