"""The confirm agent and timer in Faust's test context: no broker, sends captured."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailbus.accounts import Account, Directory, SmtpAccount
from mailbus.codec import Registry
from mailbus.confirm import join
from mailbus.confirm.settings import ConfirmSettings
from mailbus.confirm.stream import ConfirmApp, now_us

REGISTRY = Registry.load()
T0 = datetime.now(UTC).replace(microsecond=0)
ACCOUNTS = Directory([
    Account(id="fast", kind="smtp", from_address="f@example.test", confirm_within_seconds=5,
            smtp=SmtpAccount(host="127.0.0.1")),
])


def sent(mid: str, account: str = "fast", seconds: float = 0) -> bytes:
    return REGISTRY.encode("email.sent", {
        "event_id": f"s-{mid}", "message_id": mid, "occurred_at": T0 + timedelta(seconds=seconds),
        "account_id": account, "transport": "smtp", "rfc822_message_id": f"<{mid}@x>",
        "requested_at": T0 - timedelta(seconds=1)})


def delivered(mid: str, seconds: float = 2) -> bytes:
    return REGISTRY.encode("email.delivered", {
        "event_id": f"d-{mid}", "message_id": mid,
        "occurred_at": T0 + timedelta(seconds=seconds), "evidence": "dsn"})


class Harness:
    """A ConfirmApp whose verdicts land in a list instead of Kafka."""

    def __init__(self, tmp: Path, fail_sends: int = 0, fail_writes: int = 0):
        settings = ConfirmSettings(kafka={"password": "unit-test-only", "topic_prefix": "u."},
                                   batch_seconds=0.02, data_dir=tmp, accounts_file=tmp / "none")
        self.confirm = ConfirmApp(settings, registry=REGISTRY, accounts=ACCOUNTS)
        self.out: list[tuple[bytes, dict[str, Any]]] = []
        self.writes: list[tuple[int, str, Any]] = []  # (partition, key, value)
        self.fail_sends, self.fail_writes = fail_sends, fail_writes
        self.order: list[tuple[str, Any]] = []  # what reached "Kafka", in order

        async def send(key: bytes, value: bytes) -> None:
            if self.fail_sends:
                self.fail_sends -= 1
                raise ConnectionError("broker away")
            self.out.append((key, REGISTRY.decode(value, "email.confirmed")[1]))
            self.order.append(("verdict", key.decode()))

        self.confirm.send = send  # type: ignore[method-assign]
        self.confirm.app.finalize()
        self.confirm.app.flow_control.resume()

    async def drain_changelog(self) -> None:
        """Stand in for the producer: record each changelog write and ack it."""
        queue = self.confirm.app.producer.buffer.pending
        while True:
            future = await queue.get()
            message = future.message
            assert message.channel.get_topic_name() == "u.mailbus-confirm-messages-changelog"
            # Serialized already (JSON); a tombstone's value is None.
            value = None if message.value is None else json.loads(message.value)
            if self.fail_writes:
                self.fail_writes -= 1
                future.set_exception(ConnectionError("broker away"))
                continue
            self.writes.append((message.partition, json.loads(message.key), value))
            self.order.append(("state", value and value["verdict"]))
            future.set_result(None)

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; emitted {self.out}"
            await asyncio.sleep(0.01)


def scenario(fun: Callable[[Harness, Any], Awaitable[None]], tmp: Path, **kw: Any) -> Harness:
    harness = Harness(tmp, **kw)

    async def run() -> None:
        drain = asyncio.create_task(harness.drain_changelog())
        try:
            async with harness.confirm.agent.test_context() as agent:
                await fun(harness, agent)
        finally:
            drain.cancel()

    asyncio.run(run())
    return harness


def test_both_orders_confirm_once_and_state_goes_to_the_source_partition(tmp_path):
    async def body(h: Harness, agent: Any) -> None:
        for value, key, partition in [
            (sent("a"), b"a", 2), (delivered("b"), b"b", 4), (sent("a"), b"a", 2),
            (delivered("a"), b"a", 2), (sent("b"), b"b", 4), (delivered("a"), b"a", 2),
        ]:
            await agent.put(value=value, key=key, partition=partition)
        await h.until(lambda: len(h.out) == 2)
        # Duplicates after the verdict, in a later batch.
        await agent.put(value=sent("b"), key=b"b", partition=4)
        await agent.put(value=delivered("b"), key=b"b", partition=4)
        await agent.put(value=sent("c"), key=b"c", partition=1)
        await h.until(lambda: h.confirm.table.get("c") is not None)

    h = scenario(body, tmp_path)
    assert sorted(k for k, _ in h.out) == [b"a", b"b"]
    for key, record in h.out:
        assert record["message_id"] == key.decode() and record["outcome"] == "confirmed"
        assert record["event_id"] == join.verdict_id(key.decode(), "confirmed")
        assert record["account_id"] == "fast" and record["evidence"] == "dsn"
        assert record["sent_to_delivered_us"] == 2_000_000
        assert record["requested_to_delivered_us"] == 3_000_000
    table = h.confirm.table
    assert table["a"]["verdict"] == table["b"]["verdict"] == "confirmed"
    writes = h.writes
    # Each key's changelog writes go to its events' partition, whatever the
    # batch's last event was; the last write of a key is its table value.
    assert {(p, k) for p, k, _ in writes} == {(2, "a"), (4, "b"), (1, "c")}
    assert {k: v for _, k, v in writes} == {k: table[k] for k in "abc"}


def test_undecodable_records_are_logged_and_skipped(tmp_path, caplog):
    async def body(h: Harness, agent: Any) -> None:
        await agent.put(value=b"not avro", key=b"x", partition=3)
        await agent.put(value=REGISTRY.encode("email.delivered", {
            "event_id": "e", "message_id": "x", "occurred_at": T0,
            "evidence": "dsn"})[:-3], key=b"x", partition=3)
        await agent.put(value=sent("x"), key=b"x", partition=3)
        await agent.put(value=delivered("x"), key=b"x", partition=3)
        await h.until(lambda: len(h.out) == 1)

    with caplog.at_level(logging.ERROR, logger="mailbus.confirm.stream"):
        scenario(body, tmp_path)
    skipped = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(skipped) == 2
    assert all("[3]@" in line for line in skipped)  # partition and offset are named


def test_timer_emits_unconfirmed_for_owned_partitions_then_late_delivery(tmp_path):
    now = join.micros(T0)
    assert now is not None

    async def body(h: Harness, agent: Any) -> None:
        await agent.put(value=sent("mine"), key=b"mine", partition=1)
        await agent.put(value=sent("theirs"), key=b"theirs", partition=5)
        await agent.put(value=sent("other", account="unknown-acct"), key=b"other", partition=1)
        await h.until(lambda: len(h.confirm.table) == 3)
        await h.confirm.expire({1}, now + 4_000_000)  # before the 5 s deadline
        assert h.out == []
        await h.confirm.expire({1}, now + 5_000_000)
        await h.confirm.expire({1}, now + 9_000_000)  # once only
        assert [(k, r["outcome"]) for k, r in h.out] == [(b"mine", "unconfirmed")]
        # The unknown account uses the default deadline (3600 s).
        await h.confirm.expire({1}, now + 3600 * 1_000_000)
        assert [k for k, _ in h.out] == [b"mine", b"other"]
        await agent.put(value=delivered("mine", seconds=60), key=b"mine", partition=1)
        await h.until(lambda: len(h.out) == 3)

    h = scenario(body, tmp_path)
    assert [(k, r["outcome"]) for k, r in h.out] == [
        (b"mine", "unconfirmed"), (b"other", "unconfirmed"), (b"mine", "confirmed")]
    assert h.out[0][1]["delivered_at"] is None and h.out[0][1]["evidence"] == "unknown"
    assert h.out[2][1]["sent_to_delivered_us"] == 60_000_000
    assert h.confirm.table["theirs"]["verdict"] is None  # another worker's partition


def test_timer_forgets_settled_messages_with_a_tombstone(tmp_path):
    async def body(h: Harness, agent: Any) -> None:
        await agent.put(value=sent("done"), key=b"done", partition=0)
        await agent.put(value=delivered("done"), key=b"done", partition=0)
        await agent.put(value=sent("waiting"), key=b"waiting", partition=0)
        await h.until(lambda: len(h.out) == 1 and len(h.confirm.table) == 2)
        h.writes.clear()
        later = now_us() + h.confirm.settings.forget_after_seconds * 1_000_000
        await h.confirm.expire({0}, later)

    h = scenario(body, tmp_path)
    assert "done" not in h.confirm.table
    assert (0, "done", None) in h.writes
    # The pending message got its unconfirmed verdict instead of being dropped.
    assert h.confirm.table["waiting"]["verdict"] == "unconfirmed"


def test_verdict_is_acked_before_its_state_and_failures_are_retried(tmp_path):
    async def body(h: Harness, agent: Any) -> None:
        await agent.put(value=sent("r"), key=b"r", partition=0)
        await h.until(lambda: h.writes != [])
        await agent.put(value=delivered("r"), key=b"r", partition=0)
        await h.until(lambda: any(v and v["verdict"] for _, _, v in h.writes))

    h = scenario(body, tmp_path, fail_sends=1, fail_writes=1)
    assert [k for k, _ in h.out] == [b"r"] and h.fail_sends == h.fail_writes == 0
    # The first state write failed and was written again; the verdict went out
    # (after one failed try) before the state that records it.
    assert h.order == [("state", None), ("verdict", "r"), ("state", "confirmed")]
    assert h.confirm.table["r"]["verdict"] == "confirmed"


def test_recovery_stops_the_consumer_flow_until_faust_resumes_it(tmp_path):
    # The workaround for faust-streaming #596: Faust resumes the flow itself
    # after clearing the stream queues; the table's hook runs before that.
    h = Harness(tmp_path)
    consumer = h.confirm.app.consumer
    consumer.resume_flow()

    async def recovered() -> None:
        await h.confirm.table.on_recovery_completed(set(), set())

    asyncio.run(recovered())
    assert not consumer.flow_active


@pytest.mark.parametrize("partitions", [1, 6])
def test_table_follows_the_partitions_setting(tmp_path, partitions):
    settings = ConfirmSettings(kafka={"password": "unit-test-only"}, table_partitions=partitions,
                               accounts_file=tmp_path / "none", data_dir=tmp_path)
    confirm = ConfirmApp(settings, registry=REGISTRY, accounts=ACCOUNTS)
    assert confirm.table.changelog_topic.partitions == partitions
    assert confirm.app.conf.id == "mailbus-confirm"
