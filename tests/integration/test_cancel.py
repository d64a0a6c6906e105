"""Cancelling and rescheduling queued messages: the API, the real sender, the ledger.

The API on a real socket, the sender in a thread against a real SMTP
server, Kafka and PostgreSQL; the race with the claim is run with the
sender's own claim statement on rows locked by real transactions.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from mailbus import topics
from mailbus.db import open_pool
from mailbus.provision import provision
from mailbus.sender import decisions
from mailbus.sender.outbox import SQL as SENDER_SQL
from mailbus.sender.outbox import Ledger
from mailbus.sender.settings import SenderSettings
from mailbus.settings import ServiceSettings
from tests.integration.conftest import LiveServer
from tests.support.kafka import read_all
from tests.support.projector import lag, projector_running, settings_for
from tests.support.sender import SenderThread, smtp_account
from tests.support.smtp import SmtpServer

T = TypeVar("T")
INSTANCE = str(uuid.uuid4())  # the claiming sender instance


def eventually(check: Callable[[], T], timeout: float = 30.0) -> T:
    """check() once it returns something truthy (it may raise meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def ledger(admin: ServiceSettings, namespace: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        rows = conn.execute("SELECT message_id::text, state FROM send_ledger"
                            " WHERE namespace = %s AND message_id = ANY(%s::uuid[])",
                            (namespace, ids)).fetchall()
    return dict(rows)


def message(send_at: datetime | None = None, to: str = "ada@example.com") -> dict[str, Any]:
    body: dict[str, Any] = {"from": "dev", "to": [to], "subject": "Scheduled",
                            "text": "See you then."}
    if send_at is not None:
        body["send_at"] = send_at.isoformat()
    return body


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def sender_settings(namespace: str, tmp_path: Path, smtp: SmtpServer) -> SenderSettings:
    path = tmp_path / "sender-accounts.toml"
    path.write_text(smtp_account("dev", smtp.port, connections=2))
    return SenderSettings(accounts_file=path, kafka={"topic_prefix": namespace},
                          metrics_port=0, retry_base_seconds=0.2, retry_cap_seconds=1.0,
                          poll_seconds=0.2, link_keys_file=tmp_path / "link-keys.json")


def client(live: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=30,
                        headers={"Authorization": f"Bearer {token}"})


def queued(api: httpx.Client, message_id: str, verb: str = "cancel",
           body: dict[str, Any] | None = None) -> httpx.Response:
    """The answer once the sender admitted the message (409 not-queued-yet before)."""
    def ask() -> httpx.Response | None:
        r = api.post(f"/v1/messages/{message_id}/{verb}", json=body)
        if r.status_code == 409 and r.json()["type"] == "/problems/not-queued-yet":
            assert r.headers["Retry-After"] == "1"
            return None
        return r
    return eventually(ask)


def schedule_events(admin_kafka: dict[str, Any], namespace: str, registry: Any,
                    expect: int | None = None) -> list[dict[str, Any]]:
    return [registry.decode(m.value())[1] for m in read_all(
        admin_kafka, namespace + "email.schedule", expect=expect, timeout=30)]


def test_cancel_and_reschedule_through_the_api(live_ingest, make_key, sender_settings, smtp,
                                               namespace, admin, admin_kafka, registry):
    _, token = make_key(("send", "read"))
    _, other_token = make_key(("send", "read"))
    _, reader_token = make_key(("read",))
    later = datetime.now(UTC) + timedelta(hours=1)
    with client(live_ingest, token) as api, client(live_ingest, other_token) as other, \
            client(live_ingest, reader_token) as reader:
        cancel_me = api.post("/v1/messages", json=message(later)).json()["id"]
        move_me = api.post("/v1/messages", json=message(later, "bob@example.com")).json()["id"]
        # Before the sender runs, nothing is in its ledger yet: ask again.
        early = api.post(f"/v1/messages/{cancel_me}/cancel")
        assert early.status_code == 409 and early.headers["Retry-After"] == "1"
        assert early.headers["content-type"] == "application/problem+json"
        with SenderThread(sender_settings):
            # Another key's message is not found, exactly as a message that does not exist.
            foreign = queued(other, cancel_me)
            missing = other.post(f"/v1/messages/{uuid.uuid4()}/cancel")
            assert foreign.status_code == missing.status_code == 404
            assert foreign.json() == missing.json() | {"instance": foreign.json()["instance"]} \
                or foreign.json()["type"] == missing.json()["type"] == "/problems/not-found"
            assert other.post("/v1/messages/not-a-uuid/cancel").status_code == 404
            assert reader.post(f"/v1/messages/{cancel_me}/cancel").status_code == 403

            done = queued(api, cancel_me, body={"reason": "order withdrawn"})
            assert done.status_code == 200, done.text
            assert done.json() == {"id": cancel_me, "result": "cancelled", "status": "cancelled"}
            again = api.post(f"/v1/messages/{cancel_me}/cancel")
            assert again.json() == {"id": cancel_me, "result": "already_cancelled",
                                    "status": "cancelled"}
            late = api.post(f"/v1/messages/{cancel_me}/reschedule",
                            json={"send_at": datetime.now(UTC).isoformat()})
            assert late.status_code == 409 and late.json()["state"] == "cancelled"
            assert late.json()["type"] == "/problems/too-late"

            soon = datetime.now(UTC) + timedelta(seconds=2)
            moved = queued(api, move_me, "reschedule", {"send_at": soon.isoformat()})
            assert moved.status_code == 200, moved.text
            assert moved.json()["result"] == "rescheduled"
            assert datetime.fromisoformat(moved.json()["send_at"]) == soon
            # It goes at its new time; then it is too late to cancel.
            eventually(lambda: ledger(admin, namespace, [move_me]).get(move_me) == "sent")
            sent = api.post(f"/v1/messages/{move_me}/cancel")
            assert sent.status_code == 409
            assert sent.json()["state"] == "sent" and sent.json()["type"] == "/problems/too-late"
            events = schedule_events(admin_kafka, namespace, registry, expect=2)
            # The cancelled one never reaches the transport: wait out a due time past now.
            time.sleep(1.0)
        assert ledger(admin, namespace, [cancel_me]) == {cancel_me: "cancelled"}
        assert [m["To"] for m in smtp.handler.messages()] == ["bob@example.com"]
        by_change = {e["change"]: e for e in events}
        assert by_change["cancelled"]["message_id"] == cancel_me
        assert by_change["cancelled"]["reason"] == "order withdrawn"
        assert by_change["cancelled"]["account_id"] == "dev"
        assert by_change["rescheduled"]["message_id"] == move_me
        assert by_change["rescheduled"]["send_at"] == soon.replace(
            microsecond=soon.microsecond)

        # The projection: a status of its own, a timeline entry, a status filter.
        with projector_running(settings_for(namespace)):
            def projected() -> dict[str, Any] | None:
                got = api.get(f"/v1/messages/{cancel_me}").json()
                return got if got["status"] == "cancelled" else None
            shown = eventually(projected)
            kinds = [e["kind"] for e in shown["timeline"]]
            assert kinds == ["requested", "cancelled"]
            assert shown["timeline"][1]["detail"]["reason"] == "order withdrawn"
            listed = eventually(lambda: api.get("/v1/messages",
                                                params={"status": "cancelled"}).json()["messages"])
            assert [m["id"] for m in listed] == [cancel_me]
            moved_shown = eventually(lambda: (r := api.get(f"/v1/messages/{move_me}").json())
                                     ["status"] in ("delivered", "confirmed", "sent") and r)
            assert "rescheduled" in [e["kind"] for e in moved_shown["timeline"]]
            assert datetime.fromisoformat(moved_shown["send_at"]) == soon


def test_scheduling_reaches_the_documented_horizon_and_no_further(live_ingest, make_key):
    _, token = make_key(("send",))
    with client(live_ingest, token) as api:
        near = datetime.now(UTC) + timedelta(days=29, hours=23)
        assert api.post("/v1/messages", json=message(near)).status_code == 202
        far = api.post("/v1/messages", json=message(datetime.now(UTC) + timedelta(days=31)))
        assert far.status_code == 422
        assert [e["field"] for e in far.json()["errors"]] == ["send_at"]
        too_far = api.post(f"/v1/messages/{uuid.uuid4()}/reschedule",
                           json={"send_at": (datetime.now(UTC) + timedelta(days=31)).isoformat()})
        assert too_far.status_code == 422
        assert [e["field"] for e in too_far.json()["errors"]] == ["send_at"]
        naive = api.post(f"/v1/messages/{uuid.uuid4()}/reschedule",
                         json={"send_at": "2030-01-01T00:00:00"})
        assert naive.status_code == 422
        for bad in ({"reason": "a\r\nBcc: x@example.com"}, {"reason": "x" * 201},
                    {"reason": "ok", "extra": 1}):
            r = api.post(f"/v1/messages/{uuid.uuid4()}/cancel", json=bad)
            assert r.status_code == 422, bad
            assert r.json()["errors"][0]["field"] in ("reason", "extra")


# --- the ledger: the race with the claim, rewinds, retention -------------------------

def role(name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(ServiceSettings(service_name=name).postgres.conninfo())


def seed(namespace: str, key_id: str, n: int, due: datetime) -> list[str]:
    """n messages of key_id, admitted into the ledger of partition 0, due at `due`."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    now = datetime.now(UTC)
    with role("owner") as conn:
        for mid in ids:
            conn.execute("INSERT INTO messages (id, key_id, account_id, recipients,"
                         " requested_at) VALUES (%s, %s, 'dev', 1, %s)", (mid, key_id, now))
            conn.execute("INSERT INTO send_ledger (message_id, namespace, account_id,"
                         " source_partition, due_at, payload) VALUES (%s, %s, 'dev', 0, %s,"
                         " 'x')", (mid, namespace, due))
    return ids


def change(namespace: str, message_id: str, key_id: str | None,
           due_at: datetime | None = None, conn: psycopg.Connection[Any] | None = None
           ) -> tuple[str, str | None]:
    own = conn is None
    conn = conn or role("ingest")
    try:
        row = conn.execute("SELECT outcome, state FROM change_schedule(%s, %s, %s, %s, %s)",
                           (namespace, message_id, key_id, due_at,
                            b"\xc3\x01" + b"\0" * 20)).fetchone()
        assert row is not None
        return row[0], row[1]
    finally:
        if own:
            conn.commit()
            conn.close()


def claim(namespace: str, limit: int = 100) -> list[str]:
    """The sender's own claim statement, as its worker runs it."""
    async def run() -> list[str]:
        settings = ServiceSettings(service_name="sender")
        async with open_pool(settings.postgres) as pool:
            led = Ledger(pool, namespace, owner=INSTANCE)
            epochs, _ = await led.take_over([0])
            rows = await led.claim("dev", epochs, limit, pool_only=False)
            return [str(r["message_id"]) for r in rows]
    return asyncio.run(run())


def test_a_claim_in_progress_wins_and_the_cancel_says_too_late(namespace, make_key):
    key_id, _ = make_key()
    [mid] = seed(namespace, key_id, 1, datetime.now(UTC) - timedelta(seconds=1))
    claimer = role("sender")
    # A claim that has taken the row and not committed yet.
    claimer.execute("SELECT message_id FROM send_ledger WHERE namespace = %s AND"
                    " message_id = %s FOR UPDATE", (namespace, mid))
    claimer.execute("UPDATE send_ledger SET state = 'sending' WHERE namespace = %s AND"
                    " message_id = %s", (namespace, mid))
    result: list[tuple[str, str | None]] = []
    waiter = threading.Thread(target=lambda: result.append(change(namespace, mid, key_id)))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not result  # the cancel waits on the claim's lock
    claimer.commit()
    waiter.join(10)
    assert result == [("too_late", "sending")]
    claimer.close()


def test_a_cancel_in_progress_wins_and_the_real_claim_skips_it(namespace, make_key):
    key_id, _ = make_key()
    ids = seed(namespace, key_id, 3, datetime.now(UTC) - timedelta(seconds=1))
    canceller = role("ingest")
    assert change(namespace, ids[0], key_id, conn=canceller) == ("cancelled", "cancelled")
    # Uncommitted: the claim skips the locked row and takes the others.
    assert sorted(claim(namespace)) == sorted(ids[1:])
    canceller.commit()
    canceller.close()
    # A take-over (claim() runs one) re-queues the two left `sending`; the cancelled
    # row is never claimed.
    assert sorted(claim(namespace)) == sorted(ids[1:])
    with role("owner") as conn:
        state, payload = conn.execute(
            "SELECT state, payload FROM send_ledger WHERE namespace = %s AND message_id = %s",
            (namespace, ids[0])).fetchone() or ("", b"")
        outbox = conn.execute("SELECT topic, key FROM sender_outbox WHERE namespace = %s"
                              " AND message_id = %s", (namespace, ids[0])).fetchall()
    assert (state, payload) == ("cancelled", None)
    assert outbox == [(namespace + "email.schedule", ids[0].encode())]


def test_what_cannot_be_cancelled(namespace, make_key):
    key_id, _ = make_key()
    other_key, _ = make_key()
    soon = datetime.now(UTC) + timedelta(hours=1)
    partly, ambiguous, rerouted, foreign = seed(namespace, key_id, 4, soon)
    with role("owner") as conn:
        conn.execute("UPDATE send_ledger SET sent_at = now(), pending_recipients ="
                     " ARRAY['grey@example.com'] WHERE message_id = %s", (partly,))
        conn.execute("UPDATE send_ledger SET ambiguous = true WHERE message_id = %s",
                     (ambiguous,))
        conn.execute("UPDATE send_ledger SET state = 'rerouted' WHERE message_id = %s",
                     (rerouted,))
    assert change(namespace, partly, key_id) == ("too_late", "partly_sent")
    assert change(namespace, ambiguous, key_id) == ("too_late", "ambiguous")
    assert change(namespace, rerouted, key_id)[0] == "not_admitted"
    assert change(namespace, foreign, other_key)[0] == "not_found"
    # Another installation's namespace has no such row.
    assert change(namespace + "x.", foreign, key_id)[0] == "not_admitted"
    # An admin key (NULL) may change any key's message.
    assert change(namespace, foreign, None, soon + timedelta(hours=1)) == (
        "rescheduled", "queued")
    with role("ingest") as conn, pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM change_schedule(%s, %s, %s, NULL, %s)",
                     (namespace, foreign, key_id, b"not avro"))


def test_a_rewind_never_admits_a_cancelled_message_again_until_retention(namespace,
                                                                          make_key):
    key_id, _ = make_key()
    [mid] = seed(namespace, key_id, 1, datetime.now(UTC) + timedelta(hours=1))
    assert change(namespace, mid, key_id) == ("cancelled", "cancelled")
    row = decisions.admission({"message_id": mid, "account_id": "dev"}, b"again", 0,
                              datetime.now(UTC))

    async def readmit_and_prune(keep: float) -> tuple[int, int]:
        settings = ServiceSettings(service_name="sender")
        async with open_pool(settings.postgres) as pool:
            led = Ledger(pool, namespace)
            await led.admit([row])  # the same record read again (a rewind, a replay)
            return await led.prune(keep_seconds=keep, payload_seconds=keep, batch=100)

    assert asyncio.run(readmit_and_prune(keep=3600)) == (0, 0)
    with role("owner") as conn:
        assert conn.execute("SELECT state, payload FROM send_ledger WHERE message_id = %s",
                            (mid,)).fetchone() == ("cancelled", None)
        conn.execute("UPDATE send_ledger SET settled_at = now() - interval '2 hours'"
                     " WHERE message_id = %s", (mid,))
    # Past the retention (which outlives email.requested's) the row goes with the others.
    assert asyncio.run(readmit_and_prune(keep=3600))[0] == 1
    assert SENDER_SQL["prune_settled"].count("'cancelled'") == 1


def test_provisioning_raises_an_existing_requested_topics_retention(namespace, admin,
                                                                    admin_kafka):
    # An installation made before the 30-day horizon keeps email.requested a
    # week; provisioning again brings it to the table's retention.
    client = AdminClient(admin_kafka)
    resource = ConfigResource(ConfigResource.Type.TOPIC, namespace + topics.REQUESTED,
                              incremental_configs=[ConfigEntry(
                                  "retention.ms", str(topics.WEEK_MS),
                                  incremental_operation=AlterConfigOpType.SET)])
    for future in client.incremental_alter_configs([resource]).values():
        future.result()

    def retention() -> str:
        [future] = client.describe_configs([ConfigResource(
            ConfigResource.Type.TOPIC, namespace + topics.REQUESTED)]).values()
        return str(future.result()["retention.ms"].value)

    # A config change reaches the broker's answers a moment after the controller took it.
    eventually(lambda: retention() == str(topics.WEEK_MS))
    done = provision(admin_kafka, admin.var_dir / "secrets", namespace, users=False)
    assert done["topics_reconfigured"] == [namespace + topics.REQUESTED]
    eventually(lambda: retention() == str(topics.REQUESTED_RETENTION_MS))
    again = provision(admin_kafka, admin.var_dir / "secrets", namespace, users=False)
    assert again["topics_reconfigured"] == []


def test_a_message_waiting_for_quota_can_be_cancelled(live_ingest, make_key, namespace,
                                                      tmp_path, smtp, admin):
    # An account with a daily quota of one: the second message waits in the
    # queue until the quota frees up, and is cancelled there.
    path = tmp_path / "quota-accounts.toml"
    path.write_text(smtp_account("dev", smtp.port, quota=1))
    settings = SenderSettings(accounts_file=path, kafka={"topic_prefix": namespace},
                              metrics_port=0, poll_seconds=0.2,
                              link_keys_file=tmp_path / "link-keys.json")
    _, token = make_key(("send", "read"))
    with client(live_ingest, token) as api, SenderThread(settings):
        ids = [api.post("/v1/messages", json=message(to=f"u{i}@example.com")).json()["id"]
               for i in range(2)]
        states = eventually(lambda: (s := ledger(admin, namespace, ids))
                            and sorted(s.values()) == ["queued", "sent"] and s)
        [waiting] = [m for m, s in states.items() if s == "queued"]
        # Due, and held back by the account's budget. A worker that claimed it
        # ahead gives it back unsent (a requeue for quota): then it is `sending`
        # for a moment, and a cancel in that moment is answered too late.
        time.sleep(1.0)

        def cancel() -> dict[str, Any] | None:
            r = api.post(f"/v1/messages/{waiting}/cancel")
            if r.status_code == 409 and r.json()["state"] == "sending":
                return None
            return r.json()  # type: ignore[no-any-return]
        assert eventually(cancel) == {"id": waiting, "result": "cancelled",
                                      "status": "cancelled"}
    assert ledger(admin, namespace, ids)[waiting] == "cancelled"
    assert len(smtp.handler.messages()) == 1


def test_the_same_request_read_again_does_not_bring_a_cancelled_message_back(
        live_ingest, make_key, sender_settings, smtp, namespace, admin, admin_kafka):
    # A replay into the live namespace, or an offset reset, hands the sender the
    # very record again: the ledger's cancelled row keeps it from being sent.
    _, token = make_key(("send", "read"))
    with client(live_ingest, token) as api, SenderThread(sender_settings) as running:
        # Timed from the sender owning its partitions: the lead covers admission
        # and the cancel only.
        running.wait_owning_all()
        due = datetime.now(UTC) + timedelta(seconds=12)
        mid = api.post("/v1/messages", json=message(due)).json()["id"]
        assert queued(api, mid).json()["result"] == "cancelled"
        [record] = read_all(admin_kafka, namespace + topics.REQUESTED, expect=1)
        producer = Producer({**admin_kafka, "partitioner": "murmur2_random"})
        producer.produce(namespace + topics.REQUESTED, record.value(), key=record.key())
        assert producer.flush(30) == 0
        # Admitted (the sender's group committed past it: a no-op in the ledger),
        # and past its due time, with the sender claiming.
        eventually(lambda: lag(admin_kafka, namespace, "mailbus-sender",
                               [topics.REQUESTED]) == 0)
        time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 3.0)
        assert ledger(admin, namespace, [mid]) == {mid: "cancelled"}
    assert smtp.handler.messages() == []


def test_a_reschedule_keeps_the_messages_files_until_its_new_time(
        live_ingest, make_key, sender_settings):
    _, token = make_key(("send", "read"))
    _, other_token = make_key(("send", "read"))
    later = datetime.now(UTC) + timedelta(hours=1)
    moved = later + timedelta(days=20)
    with client(live_ingest, token) as api, client(live_ingest, other_token) as other:
        invoice = api.post("/v1/attachments", content=b"%PDF-1.7 invoice 4711",
                           headers={"Content-Type": "application/octet-stream"}).json()["id"]
        # The other key holds a file of its own, and the same bytes as ours.
        spare = other.post("/v1/attachments", content=b"%PDF-1.7 another file",
                           headers={"Content-Type": "application/octet-stream"}).json()["id"]
        other.post("/v1/attachments", content=b"%PDF-1.7 invoice 4711",
                   headers={"Content-Type": "application/octet-stream"})
        body = message(later) | {"attachments": [
            {"id": invoice, "filename": "invoice.pdf", "content_type": "application/pdf"}]}
        accepted = api.post("/v1/messages", json=body)
        assert accepted.status_code == 202, accepted.text
        message_id = accepted.json()["id"]

        def expiries() -> dict[tuple[bool, str], datetime]:
            with role("owner") as conn:
                rows = conn.execute(
                    "SELECT r.key_id = m.key_id, r.sha256, r.expires_at FROM attachment_refs r,"
                    " messages m WHERE m.id = %s AND r.sha256 = ANY(%s)",
                    (message_id, [invoice, spare])).fetchall()
            return {(own, sha): at for own, sha, at in rows}

        before = expiries()
        assert before[(True, invoice)] < moved  # kept for its first time only
        with SenderThread(sender_settings):
            answer = queued(api, message_id, "reschedule", {"send_at": moved.isoformat()})
        assert answer.status_code == 200, answer.text
        after = expiries()
        # Our reference now lasts past the new time by what a message's files get;
        # the other key's references of the same bytes and of its own file stay put.
        assert after[(True, invoice)] >= moved + timedelta(days=8)
        assert after[(False, invoice)] == before[(False, invoice)]
        assert after[(False, spare)] == before[(False, spare)]
