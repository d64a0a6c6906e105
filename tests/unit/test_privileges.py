"""The comparison `mailbus doctor` makes of a role's rights with mailbus/privileges.py."""

from __future__ import annotations

from mailbus.privileges import TABLE_RIGHTS, Difference, Seen, differences, fix

LEDGER = ("message_id", "state", "due_at")


def seen_as_expected(service: str) -> dict[str, Seen]:
    out = {}
    for table, r in TABLE_RIGHTS[service].items():
        columns = LEDGER if table == "send_ledger" else (
            "id", *(r.update if isinstance(r.update, tuple) else ()))
        update = columns if r.update is True else tuple(c for c in columns
                                                         if r.update and c in r.update)
        out[table] = Seen(columns, r.select, r.insert, r.delete, update)
    out["schema_migrations"] = Seen(("version",), False, False, False, ())
    return out


def test_rights_as_expected_make_no_difference() -> None:
    for service in TABLE_RIGHTS:
        assert differences(service, seen_as_expected(service)) == [], service


def test_a_missing_right_and_one_too_many_are_told_apart_with_their_fix() -> None:
    seen = seen_as_expected("sender")
    seen["send_ledger"] = Seen(LEDGER, True, True, True, ("message_id",))
    seen["schema_migrations"] = Seen(("version",), True, False, False, (), other=True)
    found = differences("sender", seen)
    assert found == [
        Difference("schema_migrations", "SELECT", missing=False),
        Difference("schema_migrations", "TRUNCATE, REFERENCES, TRIGGER", missing=False),
        Difference("send_ledger", "UPDATE", ("state", "due_at"))]
    assert str(found[2]) == "UPDATE (state, due_at) on send_ledger"
    assert fix(found[2], "mailbus_sender") == \
        'GRANT UPDATE ("state", "due_at") ON "send_ledger" TO "mailbus_sender"'
    assert fix(found[0], "mailbus_sender") == \
        'REVOKE SELECT ON "schema_migrations" FROM "mailbus_sender"'


def test_a_table_the_role_needs_and_the_database_lacks_is_a_difference() -> None:
    seen = seen_as_expected("replies")
    del seen["mailbox_state"]
    [missing] = differences("replies", seen)
    assert missing == Difference("mailbox_state", "table missing")
    assert "mailbus setup db" in fix(missing, "mailbus_replies")
