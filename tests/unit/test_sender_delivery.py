"""A claimed row's delivery: the pure decisions of delivery.py, and the executor carrying
them out against a ledger and a transport written here by hand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailbus.accounts import Account, Directory, SmtpAccount
from mailbus.errors import MailbusError
from mailbus.sender import delivery, metrics
from mailbus.sender.composer import Failure
from mailbus.sender.context import Claimed
from mailbus.sender.decisions import MAX_REROUTES, Fail, Reroute, Retry
from mailbus.sender.delivery import (
    SUPPRESSED,
    Delivered,
    Delivery,
    Handover,
    NothingLeft,
    Requeue,
    Retries,
)
from mailbus.sender.executor import Executor
from mailbus.sender.quota import Budget, Exhausted
from mailbus.sender.sandbox import SandboxUnavailable
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    Ambiguous,
    Outgoing,
    PermanentError,
    SendError,
    TransientError,
)

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
RETRIES = Retries(max_attempts=3, base=10.0, cap=600.0)
HEADER = "<m1@example.com>"


def account(id_: str, pools: tuple[str, ...] = ("p",)) -> Account:
    return Account(id=id_, kind="smtp", from_address=f"{id_}@example.com", pools=pools,
                   smtp=SmtpAccount(host="127.0.0.1"))


ACCOUNT = account("a")
SINK = account("sink", pools=())
DIRECTORY = Directory([ACCOUNT, account("b"), account("c")])


def row(**kw: Any) -> Claimed:
    base: dict[str, Any] = {"message_id": "m1", "payload": b"request", "attempts": 1,
                            "ambiguous": False, "reroutes": 0, "partition": 0, "pool": "p"}
    return Claimed(**(base | kw))


def outgoing(*recipients: str) -> Outgoing:
    return Outgoing("a@example.com", list(recipients or ("x@example.org",)), b"raw", HEADER)


def nobody(_address: str) -> bool:
    return False


def never(**_kw: Any) -> dict[str, int]:
    raise AssertionError("quota read where no failover can follow")


def answer(result: Accepted | SendError, claimed: Claimed | None = None,
           left: Any = never, latency_us: int | None = 7) -> Delivery:
    return delivery.handed_over(claimed or row(), result, HEADER, latency_us=latency_us,
                                account_id="a", directory=DIRECTORY, left=left,
                                retries=RETRIES, claimed_at=T0, now=T0 + timedelta(seconds=1))


# --- composing failed -------------------------------------------------------------

def test_a_composer_failure_fails_the_message_and_leaves_the_quota():
    step = delivery.not_composed(Failure("template: no such variable", True), row(), RETRIES, T0)
    assert step == Delivery(Fail("template: no such variable", True), give_back=True)


def test_an_unavailable_sandbox_is_retried_with_backoff_and_the_attempt_not_counted_a_retry():
    step = delivery.not_composed(SandboxUnavailable("no process"), row(), RETRIES, T0)
    assert step.give_back and step.park_until is None
    assert isinstance(step.action, Requeue)
    assert not step.action.handed_over and not step.action.ambiguous
    assert step.action.retry.reason == "content sandbox: no process"
    assert T0 + timedelta(seconds=5) <= step.action.retry.due_at <= T0 + timedelta(seconds=10)


def test_an_unavailable_sandbox_on_the_last_attempt_gives_up_to_the_dead_letters():
    step = delivery.not_composed(SandboxUnavailable("no process"), row(attempts=3), RETRIES, T0)
    assert isinstance(step.action, Fail) and step.give_back
    assert step.action.dead_letter and not step.action.permanent


def test_an_error_composing_fails_the_message_naming_ours_and_only_the_type_of_others():
    ours = delivery.not_composed(MailbusError("bad address"), row(), RETRIES, T0)
    assert ours == Delivery(Fail("compose: bad address", True), give_back=True)
    other = delivery.not_composed(KeyError("secret-ish text"), row(), RETRIES, T0)
    assert other == Delivery(Fail("compose: unexpected KeyError", True), give_back=True)


# --- addressing ---------------------------------------------------------------------

def test_a_composed_message_goes_to_every_recipient():
    message = outgoing("x@example.org", "y@example.org")
    step = delivery.addressed(row(), message, nobody, replay_sink=False)
    assert step == Delivery(Handover(message, look_first=False, replay=False))


def test_a_partly_sent_row_goes_only_to_the_recipients_still_pending_whatever_their_case():
    message = outgoing("X@Example.org", "y@example.org", "z@example.org")
    step = delivery.addressed(row(pending=("x@example.org", "z@example.org")), message, nobody,
                              replay_sink=False)
    assert isinstance(step.action, Handover) and not step.give_back
    assert step.action.outgoing.recipients == ["X@Example.org", "z@example.org"]


def test_a_partly_sent_row_whose_pending_recipients_left_the_request_is_done():
    step = delivery.addressed(row(pending=("gone@example.org",)), outgoing(), nobody,
                              replay_sink=False)
    assert step == Delivery(NothingLeft(), give_back=True)


def test_suppressed_recipients_are_dropped_and_the_others_still_mailed():
    message = outgoing("x@example.org", "no@example.org", "y@example.org")
    step = delivery.addressed(row(), message, {"no@example.org"}.__contains__,
                              replay_sink=False)
    assert isinstance(step.action, Handover) and not step.give_back
    assert step.action.outgoing.recipients == ["x@example.org", "y@example.org"]


def test_a_message_to_suppressed_recipients_only_fails_naming_the_first():
    message = outgoing("no@example.org", "nein@example.org")
    step = delivery.addressed(row(), message, {"no@example.org", "nein@example.org"}.__contains__,
                              replay_sink=False)
    assert step == Delivery(Fail(SUPPRESSED, True, recipient="no@example.org"), give_back=True)


def test_an_ambiguous_row_looks_for_its_earlier_hand_over_first():
    step = delivery.addressed(row(ambiguous=True), outgoing(), nobody, replay_sink=False)
    assert isinstance(step.action, Handover) and step.action.look_first


def test_a_replayed_row_goes_to_the_sink_only_when_there_is_one():
    to_sink = delivery.addressed(row(replayed=True), outgoing(), nobody, replay_sink=True)
    no_sink = delivery.addressed(row(replayed=True), outgoing(), nobody, replay_sink=False)
    live = delivery.addressed(row(), outgoing(), nobody, replay_sink=True)
    assert [s.action.replay for s in (to_sink, no_sink, live)  # type: ignore[union-attr]
            ] == [True, False, False]


# --- the transport's answers --------------------------------------------------------

def test_an_earlier_hand_over_found_is_recorded_as_sent_and_not_a_duplicate():
    earlier = Accepted(["x@example.org"], provider_message_id="g1")
    assert delivery.found_earlier(earlier, HEADER) == Delivery(
        Delivered(earlier, HEADER, possible_duplicate=False, latency_us=None))


def test_an_accepted_hand_over_is_recorded_with_its_latency_and_the_rows_doubt():
    accepted = Accepted(["x@example.org"], "250 ok")
    assert answer(accepted) == Delivery(Delivered(accepted, HEADER, False, 7))
    assert answer(accepted, row(ambiguous=True)).action == Delivered(accepted, HEADER, True, 7)


def test_a_permanent_refusal_fails_the_message():
    step = answer(PermanentError("550 no such user", code=550, enhanced_status="5.1.1",
                                 recipient="x@example.org"))
    assert step == Delivery(Fail("550 no such user", True, 550, "5.1.1", "x@example.org"))


def test_a_transient_error_requeues_with_backoff_and_counts_as_a_retry():
    step = answer(TransientError("451 later", code=451))
    assert isinstance(step.action, Requeue) and not step.give_back and step.park_until is None
    assert step.action.handed_over and not step.action.ambiguous
    assert step.action.retry.refund == 0 and step.action.retry.due_at > T0


def test_a_hand_over_lost_after_data_requeues_flagged_ambiguous():
    step = answer(Ambiguous("connection dropped after DATA"))
    assert isinstance(step.action, Requeue) and step.action.ambiguous


def test_a_transient_error_on_the_last_attempt_gives_up_to_the_dead_letters():
    step = answer(TransientError("451 later", code=451), row(attempts=3))
    assert isinstance(step.action, Fail) and step.action.dead_letter
    assert step.action.reason == "gave up after 3 attempts: 451 later"


def test_an_exhausted_account_parks_and_moves_the_message_to_the_member_with_most_left():
    step = answer(AccountExhausted("daily limit", until=T0 + timedelta(hours=2)),
                  left=lambda: {"b": 5, "c": 9})
    assert step == Delivery(Reroute("c", "daily limit"), give_back=True,
                            park_until=T0 + timedelta(hours=2))


def test_an_exhausted_account_without_a_time_parks_from_the_claim_for_retry_after_or_a_minute():
    later = answer(AccountExhausted("slow down", retry_after=30), left=lambda: {"b": 1})
    assert later.park_until == T0 + timedelta(seconds=30)
    plain = answer(AccountExhausted("slow down"), left=lambda: {"b": 1})
    assert plain.park_until == T0 + timedelta(seconds=60)


def test_an_exhausted_account_with_nowhere_to_move_requeues_without_counting_the_attempt():
    until = T0 + timedelta(hours=1)
    for claimed, left in ((row(), lambda: {"b": 0, "c": 0}),  # every member exhausted
                          (row(pool=None), lambda: {"b": 5}),  # no pool
                          (row(reroutes=MAX_REROUTES), lambda: {"b": 5}),  # moved enough
                          (row(pending=("x@example.org",)), never)):  # partly sent: stays
        step = answer(AccountExhausted("daily limit", until=until), claimed, left=left)
        assert step == Delivery(Requeue(Retry(until, "daily limit", refund=1),
                                        handed_over=True), give_back=True, park_until=until)


# --- the executor, against a ledger and a transport written by hand -----------------

@dataclass
class FakeLedger:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    committed: asyncio.Event | None = None  # when set, settles wait for it

    def decode(self, row: Claimed) -> dict[str, Any]:
        return {"message_id": row.message_id, "payload": row.payload}

    async def settle(self, row: Claimed, state: str, records: list[Any],
                     **params: Any) -> None:
        self.calls.append(("settle", row.message_id, state, records))

    async def requeue(self, row: Claimed, retry: Retry, *, ambiguous: bool = False) -> None:
        self.calls.append(("requeue", row.message_id, retry, ambiguous))

    async def sent(self, row: Claimed, account: Account, accepted: Accepted, header: str, *,
                   possible_duplicate: bool, latency_us: int | None) -> None:
        if self.committed is not None:
            await self.committed.wait()
        self.calls.append(("sent", row.message_id, account.id, accepted, header,
                           possible_duplicate, latency_us))

    async def fail(self, row: Claimed, account_id: str, fail: Fail) -> None:
        self.calls.append(("fail", row.message_id, account_id, fail))

    async def reroute(self, row: Claimed, request: dict[str, Any], reroute: Reroute) -> None:
        self.calls.append(("reroute", request, reroute))


@dataclass
class FakeTransport:
    """Answers each send with the next of `answers` (an exception is raised)."""

    answers: list[Accepted | SendError] = field(default_factory=list)
    earlier: Accepted | None = None
    sent: list[Outgoing] = field(default_factory=list)
    looked_up: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None
    inside: int = 0
    most_inside: int = 0

    async def send(self, message: Outgoing) -> Accepted:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.gate is not None:
                await self.gate.wait()
            self.sent.append(message)
            result = self.answers.pop(0) if self.answers else Accepted(message.recipients)
            if isinstance(result, SendError):
                raise result
            return result
        finally:
            self.inside -= 1

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        self.looked_up.append(message_id_header)
        return self.earlier


def executor(ledger: FakeLedger, transport: FakeTransport, budget: Budget | None = None, *,
             replay: FakeTransport | None = None, connections: int = 2, settling: int = 0,
             chained: bool = False, left: dict[str, int] | None = None) -> Executor:
    return Executor(ledger, ACCOUNT, transport, budget or Budget(1000, 1_000_000.0),
                    retries=RETRIES, directory=DIRECTORY, capacity=lambda: dict(left or {}),
                    clock=lambda: T0, replay=(SINK, replay) if replay else None,
                    connections=connections, settling_per_connection=settling,
                    chained=chained)


def run(ex: Executor, step: Delivery, claimed: Claimed | None = None) -> None:
    asyncio.run(ex.run(claimed or row(), step, T0))


def handover(message: Outgoing | None = None, *, look_first: bool = False,
             replay: bool = False) -> Delivery:
    return Delivery(Handover(message or outgoing(), look_first, replay))


def test_the_executor_hands_over_and_records_the_send_with_its_latency():
    ledger, transport = FakeLedger(), FakeTransport([Accepted(["x@example.org"], "250 ok")])
    run(executor(ledger, transport), handover())
    assert transport.sent == [outgoing()] and transport.looked_up == []
    [(what, mid, via, accepted, header, duplicate, latency)] = ledger.calls
    assert (what, mid, via, accepted, header, duplicate) == (
        "sent", "m1", "a", Accepted(["x@example.org"], "250 ok"), HEADER, False)
    assert isinstance(latency, int) and latency >= 0


def test_the_executor_records_an_earlier_hand_over_found_and_sends_nothing():
    earlier = Accepted(["x@example.org"], provider_message_id="g1")
    ledger, transport = FakeLedger(), FakeTransport(earlier=earlier)
    run(executor(ledger, transport), handover(look_first=True), row(ambiguous=True))
    assert transport.looked_up == [HEADER] and transport.sent == []
    assert ledger.calls == [("sent", "m1", "a", earlier, HEADER, False, None)]


def test_the_executor_sends_again_flagged_when_no_earlier_hand_over_is_found():
    ledger, transport = FakeLedger(), FakeTransport()
    run(executor(ledger, transport), handover(look_first=True), row(ambiguous=True))
    assert transport.looked_up == [HEADER] and len(transport.sent) == 1
    assert ledger.calls[0][0] == "sent" and ledger.calls[0][5] is True  # possible duplicate


def test_the_executor_hands_a_replayed_request_to_the_sink_as_the_sink():
    ledger, own, sink = FakeLedger(), FakeTransport(), FakeTransport()
    run(executor(ledger, own, replay=sink), handover(replay=True), row(replayed=True))
    assert own.sent == [] and len(sink.sent) == 1
    assert ledger.calls[0][:3] == ("sent", "m1", "sink")


def test_the_executor_requeues_a_lost_hand_over_as_ambiguous():
    ledger = FakeLedger()
    run(executor(ledger, FakeTransport([Ambiguous("dropped after DATA")])), handover())
    [(what, _, retry, ambiguous)] = ledger.calls
    assert what == "requeue" and ambiguous and retry.reason == "dropped after DATA"


def test_the_executor_fails_a_refused_message_on_its_own_account():
    ledger = FakeLedger()
    run(executor(ledger, FakeTransport([PermanentError("550 no", code=550)])), handover())
    assert ledger.calls == [("fail", "m1", "a", Fail("550 no", True, 550))]


def test_the_executor_parks_an_exhausted_account_gives_the_send_back_and_reroutes():
    budget = Budget(1000, 1_000_000.0)
    budget.take(T0)  # the claim counted this send
    ledger = FakeLedger()
    until = T0 + timedelta(hours=3)
    ex = executor(ledger, FakeTransport([AccountExhausted("limit", until=until)]), budget,
                  left={"b": 3})
    run(ex, handover())
    assert ledger.calls == [("reroute", {"message_id": "m1", "payload": b"request"},
                             Reroute("b", "limit"))]
    assert budget.used(T0) == 0
    assert budget.decide(T0 + timedelta(hours=1)) == Exhausted(until)


def test_the_executor_records_each_decision_that_needs_no_hand_over():
    budget = Budget(1000, 1_000_000.0)
    for _ in range(3):
        budget.take(T0)
    ledger, transport = FakeLedger(), FakeTransport()
    ex = executor(ledger, transport, budget)
    retry = Retry(T0 + timedelta(minutes=1), "content sandbox: down")
    run(ex, Delivery(NothingLeft(), give_back=True))
    run(ex, Delivery(Fail(SUPPRESSED, True, recipient="no@example.org"), give_back=True))
    run(ex, Delivery(Requeue(retry), give_back=True))
    assert ledger.calls == [("settle", "m1", "sent", []),
                            ("fail", "m1", "a", Fail(SUPPRESSED, True, recipient="no@example.org")),
                            ("requeue", "m1", retry, False)]
    assert transport.sent == [] and budget.used(T0) == 0


@pytest.mark.parametrize(("chained", "at_once"), [(False, 1), (True, 2)])
def test_the_executor_hands_over_no_more_at_once_than_the_account_has_connections(
        chained: bool, at_once: int):
    """One connection; an SMTP session chains two transactions on it. Settles may wait
    for three more, which does not let more hand-overs through."""
    ledger, transport = FakeLedger(), FakeTransport(gate=asyncio.Event())

    async def scenario() -> None:
        ex = executor(ledger, transport, connections=1, settling=3, chained=chained)
        runs = [asyncio.create_task(ex.run(row(message_id=f"m{i}"), handover(), T0))
                for i in range(6)]
        for _ in range(20):  # let every run reach the hand-over it can
            await asyncio.sleep(0)
        assert transport.inside == at_once  # the others wait for the connection
        assert transport.gate is not None
        transport.gate.set()
        await asyncio.gather(*runs)

    asyncio.run(scenario())
    assert transport.most_inside == at_once and len(ledger.calls) == 6


def test_what_the_server_took_and_the_ledger_does_not_know_yet_stays_bounded():
    """One connection and one settle waiting per connection: at most two messages are
    out while their settles are not committed (what a crash may send twice)."""
    ledger, transport = FakeLedger(committed=asyncio.Event()), FakeTransport()

    async def scenario() -> None:
        ex = executor(ledger, transport, connections=1, settling=1)
        runs = [asyncio.create_task(ex.run(row(message_id=f"m{i}"), handover(), T0))
                for i in range(5)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(transport.sent) == 2 and ledger.calls == []
        assert ledger.committed is not None
        ledger.committed.set()
        await asyncio.gather(*runs)

    asyncio.run(scenario())
    assert len(transport.sent) == 5 and len(ledger.calls) == 5


def test_only_a_hand_over_that_reached_the_transport_counts_as_a_retry():
    retries = metrics.RETRIES.labels(ACCOUNT.id)
    before = retries._value.get()
    ledger = FakeLedger()
    ex = executor(ledger, FakeTransport([TransientError("451 later")]))
    run(ex, handover())
    assert retries._value.get() == before + 1
    run(ex, Delivery(Requeue(Retry(T0, "content sandbox: down")), give_back=True))
    assert retries._value.get() == before + 1
    assert [c[0] for c in ledger.calls] == ["requeue", "requeue"]


def test_the_executor_refuses_to_record_a_hand_over_it_was_not_asked_to_run():
    ex = executor(FakeLedger(), FakeTransport())
    with pytest.raises(TypeError):
        asyncio.run(ex._record(row(), Handover(outgoing(), False, False), ACCOUNT))
