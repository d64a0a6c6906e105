"""The SMTP client session (smtpwire.py) on real sockets: aiosmtpd with and without
PIPELINING, and raw servers that misbehave as a hostile or broken relay would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from mailbus.sender.smtpwire import Disconnected, LostAfterData, ReplyError, Session
from tests.support.smtp import SmtpServer


def open_session(port: int, timeout: float = 5.0) -> Awaitable[Session]:
    return Session.open("127.0.0.1", port, tls="none", context=None, timeout=timeout,
                        helo="client.test")


@pytest.fixture(params=["asyncio", "uvloop"], autouse=True)
def loop_kind(request, monkeypatch):
    """Every test on asyncio's loop (the tests' senders) and uvloop's (the service's)."""
    if request.param == "uvloop":
        monkeypatch.setattr(asyncio, "run", uvloop.run)
    return request.param


MESSAGE = (b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: dots\r\n\r\n"
           b".leading dot\r\n..two dots\r\n.\r\nlast\r\n")


@pytest.fixture(params=[True, False], ids=["pipelining", "one command at a time"])
def smtp(request):
    with SmtpServer() as server:
        server.handler.pipelining = request.param
        yield server


def test_a_transaction_delivers_the_exact_bytes_dot_stuffing_undone(smtp):
    async def run() -> tuple[dict, str, bool]:
        session = await open_session(smtp.port)
        refused, final = await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        offered = "pipelining" in session.extensions
        await session.quit()
        return refused, str(final), offered

    refused, final, offered = asyncio.run(run())
    assert refused == {} and final.startswith("250")
    assert offered is smtp.handler.pipelining
    [received] = smtp.handler.received
    assert received.data.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
    assert received.rcpt_tos == ["b@example.test"]


def test_refused_recipients_are_named_and_the_others_get_the_message(smtp):
    smtp.handler.rcpt_rule = lambda a: "550 5.1.1 no such user" if a.startswith("x") else None

    async def run() -> dict:
        session = await open_session(smtp.port)
        refused, _ = await session.send("a@sender.test", ["x1@example.test", "b@example.test",
                                                          "x2@example.test"], MESSAGE)
        # The session stays usable for the next transaction.
        await session.send("a@sender.test", ["c@example.test"], MESSAGE)
        await session.quit()
        return {r: str(reply) for r, reply in refused.items()}

    refused = asyncio.run(run())
    assert refused == {"x1@example.test": "550 5.1.1 no such user",
                       "x2@example.test": "550 5.1.1 no such user"}
    assert [m.rcpt_tos for m in smtp.handler.received] == [["b@example.test"],
                                                           ["c@example.test"]]


def test_every_recipient_refused_raises_and_the_session_goes_on(smtp):
    smtp.handler.rcpt_rule = lambda a: "450 4.2.1 try later" if a.startswith("x") else None

    async def run() -> ReplyError:
        session = await open_session(smtp.port)
        with pytest.raises(ReplyError) as caught:
            await session.send("a@sender.test", ["x1@example.test", "x2@example.test"], MESSAGE)
        assert session.connected
        await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        await session.quit()
        return caught.value

    error = asyncio.run(run())
    assert (error.command, error.reply.code, error.recipient) == ("RCPT", 450, "x1@example.test")
    assert [m.rcpt_tos for m in smtp.handler.received] == [["b@example.test"]]


def test_a_refused_message_raises_with_the_server_reply(smtp):
    smtp.handler.data_rule = lambda data: "554 5.7.1 spam" if b"dots" in data else None

    async def run() -> ReplyError:
        session = await open_session(smtp.port)
        with pytest.raises(ReplyError) as caught:
            await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        await session.quit()
        return caught.value

    error = asyncio.run(run())
    assert (error.command, str(error.reply)) == ("DATA", "554 5.7.1 spam")
    assert smtp.handler.received == []


@pytest.mark.parametrize("address", ["a@x.test>\r\nRCPT TO:<victim@evil.test",
                                     "a@x.test\nDATA", "a b@x.test", "<a@x.test>", "é@x.test",
                                     ""])
def test_an_envelope_address_that_could_inject_a_command_is_refused_unsent(smtp, address):
    async def run() -> None:
        session = await open_session(smtp.port)
        for sender, recipient in ((address, "b@example.test"), ("a@sender.test", address)):
            with pytest.raises(ValueError, match="not plain"):
                await session.send(sender, [recipient], MESSAGE)
        await session.quit()

    asyncio.run(run())
    assert smtp.handler.transactions == 0 and smtp.handler.received == []


# Raw servers: a script of replies on a real socket, for what aiosmtpd never does.

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 raw.test ESMTP\r\n")
    await reader.readline()  # EHLO
    writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
    await writer.drain()


async def _with_server(script: Script, client: Callable[[int], Awaitable[None]]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await client(port)


def test_a_connection_dropped_after_the_message_is_ambiguous_not_failed():
    taken: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        for _ in range(3):  # MAIL, RCPT, DATA: pipelined
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await writer.drain()
        taken.append(await reader.readuntil(b"\r\n.\r\n"))  # the message, then hang up

    async def client(port: int) -> None:
        session = await open_session(port)
        with pytest.raises(LostAfterData):
            await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        assert not session.connected

    asyncio.run(_with_server(script, client))
    assert len(taken) == 1 and b"..leading dot" in taken[0]


def test_a_connection_dropped_before_the_message_is_not_ambiguous():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await reader.readline()  # MAIL: hang up without a reply

    async def client(port: int) -> None:
        session = await open_session(port)
        with pytest.raises(Disconnected):
            await session.send("a@sender.test", ["b@example.test"], MESSAGE)

    asyncio.run(_with_server(script, client))


@pytest.mark.parametrize("flood", [
    b"250-" + b"x" * 100_000 + b"\r\n",  # one endless line
    b"250-x\r\n" * 10_000,  # a reply of endless lines
    b"hello, this is not SMTP\r\n",
    b"25\r\n",
], ids=["endless line", "endless reply", "not SMTP", "short line"])
def test_a_hostile_reply_ends_the_session_without_buffering_it(flood):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await reader.readline()
        writer.write(flood)
        await writer.drain()
        await asyncio.sleep(5)

    async def client(port: int) -> None:
        session = await open_session(port, timeout=3)
        with pytest.raises(Disconnected):
            await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        assert not session.connected

    asyncio.run(_with_server(script, client))


def test_a_silent_server_times_out():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await asyncio.sleep(5)

    async def client(port: int) -> None:
        session = await open_session(port)  # greeted and EHLO'd without a hurry
        session.timeout = 0.5  # then the server goes silent: this is what is tested
        with pytest.raises(TimeoutError):
            await session.send("a@sender.test", ["b@example.test"], MESSAGE)
        assert not session.connected

    asyncio.run(_with_server(script, client))


def test_starttls_required_but_not_offered_is_refused_before_any_mail():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await asyncio.sleep(1)

    async def client(port: int) -> None:
        with pytest.raises(ReplyError, match="STARTTLS"):
            await Session.open("127.0.0.1", port, tls="starttls", context=None, timeout=3,
                               helo="client.test")

    asyncio.run(_with_server(script, client))



# Chained transactions: the next one's commands ride with this one's content.

def _message(n: int) -> bytes:
    return (f"From: a@sender.test\r\nTo: b@example.test\r\nSubject: m{n}\r\n\r\n"
            f"message {n}\r\n").encode()


def test_concurrent_transactions_on_one_session_each_get_their_own_replies(smtp):
    # The third message is refused at DATA: only that send may raise, whatever the order.
    smtp.handler.data_rule = lambda data: "554 5.6.0 refused" if b"message 3" in data else None

    async def run() -> list[object]:
        session = await open_session(smtp.port)
        results = await asyncio.gather(*(
            session.send("a@sender.test", [f"r{n}@example.test"], _message(n))
            for n in range(8)), return_exceptions=True)
        assert session.connected and session.transactions == 0
        await session.quit()
        return results

    results = asyncio.run(run())
    for n, result in enumerate(results):
        if n == 3:
            assert isinstance(result, ReplyError) and result.reply.code == 554
        else:
            refused, final = result
            assert refused == {} and final.code == 250
    received = {r.rcpt_tos[0]: r.data for r in smtp.handler.received}
    assert sorted(received) == sorted(f"r{n}@example.test" for n in range(8) if n != 3)
    for n in range(8):
        if n != 3:
            assert f"message {n}".encode() in received[f"r{n}@example.test"]


def test_the_next_commands_go_out_with_the_content_before_its_reply():
    # The server answers the first message only once it has read the second's
    # commands: a client that waited for that answer before writing them would stall.
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        for _ in range(3):
            seen.append(await reader.readline())
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await writer.drain()
        seen.append(await reader.readuntil(b"\r\n.\r\n"))
        for _ in range(3):  # the second transaction's MAIL, RCPT, DATA
            seen.append(await reader.readline())
        writer.write(b"250 first taken\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await writer.drain()
        seen.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 second taken\r\n")
        await writer.drain()
        await reader.readline()  # QUIT
        writer.write(b"221 bye\r\n")
        await writer.drain()

    async def client(port: int) -> None:
        session = await open_session(port, timeout=3)
        first, second = await asyncio.gather(
            session.send("a@sender.test", ["one@example.test"], _message(1)),
            session.send("a@sender.test", ["two@example.test"], _message(2)))
        assert first[1].text == "first taken" and second[1].text == "second taken"
        await session.quit()

    asyncio.run(_with_server(script, client))
    assert seen[4].startswith(b"MAIL FROM:") and seen[5] == b"RCPT TO:<two@example.test>\r\n"


def test_a_drop_after_chained_content_is_ambiguous_for_it_only():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n.\r\n")
        for _ in range(3):  # the next transaction's commands came along: hang up now
            await reader.readline()

    async def client(port: int) -> None:
        session = await open_session(port, timeout=3)
        first, second = await asyncio.gather(
            session.send("a@sender.test", ["one@example.test"], _message(1)),
            session.send("a@sender.test", ["two@example.test"], _message(2)),
            return_exceptions=True)
        assert isinstance(first, LostAfterData)  # its content went out: it may be taken
        # The second's content never left: a plain failure, safe to send again.
        assert isinstance(second, Disconnected) and not isinstance(second, LostAfterData)

    asyncio.run(_with_server(script, client))


def test_replies_sent_in_clear_after_starttls_are_refused():
    # A man in the middle appends a reply to the 220 before TLS starts; read from
    # inside TLS it would answer a command that has not been sent yet.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-raw.test\r\n250 STARTTLS\r\n")
        await writer.drain()
        await reader.readline()  # STARTTLS
        writer.write(b"220 go ahead\r\n250 injected\r\n")
        await writer.drain()
        await asyncio.sleep(2)

    async def client(port: int) -> None:
        with pytest.raises(Disconnected, match="STARTTLS"):
            await Session.open("127.0.0.1", port, tls="starttls", context=None, timeout=3,
                               helo="client.test")

    asyncio.run(_with_server(script, client))
