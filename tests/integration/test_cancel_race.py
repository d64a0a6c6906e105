"""Cancels racing the sender's claim loop: every message sent exactly once or cancelled.

300 messages through the API, due one after another over three seconds;
while the real sender claims and delivers them to a real SMTP server, every
one is cancelled through the API in a shuffled order by eight clients at
once. Each message must end one way only: delivered exactly once (and the
cancel answered 409 too late), or cancelled (200, its ledger row
`cancelled`, one email.schedule event, nothing at the SMTP server, no
email.sent).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx

from tests.integration.test_cancel import (  # noqa: F401 - fixtures
    client,
    eventually,
    ledger,
    sender_settings,
    smtp,
)
from tests.support.kafka import read_all
from tests.support.sender import SenderThread

N = 300
SPREAD = 3.0  # seconds over which the messages fall due
LEAD = 10.0  # seconds before the first is due: admitted by then, even on a busy machine


def test_every_message_is_sent_once_or_cancelled_never_both(
        live_ingest, make_key, sender_settings, smtp, namespace, admin, admin_kafka,  # noqa: F811
        registry):
    _, token = make_key(("send", "read"))
    with SenderThread(sender_settings) as running, client(live_ingest, token) as api:
        running.wait_owning_all()  # the lead covers admission, not the group join
        start = datetime.now(UTC) + timedelta(seconds=LEAD)
        items = [{"from": "dev", "to": [f"user{i}@example.com"], "subject": f"race {i}",
                  "text": "Timing.",
                  "send_at": (start + timedelta(seconds=SPREAD * i / N)).isoformat()}
                 for i in range(N)]
        accepted = api.post("/v1/messages/batch", json={"messages": items})
        assert accepted.status_code == 202, accepted.text
        ids = [r["id"] for r in accepted.json()["results"]]
        eventually(lambda: len(ledger(admin, namespace, ids)) == N)
        assert start > datetime.now(UTC), "admission took longer than the lead"
        order = ids[:]
        random.shuffle(order)
        time.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))

        def cancel(message_id: str) -> tuple[str, int, str]:
            with httpx.Client(base_url=live_ingest.url, timeout=30,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                r = c.post(f"/v1/messages/{message_id}/cancel")
            body = r.json()
            return message_id, r.status_code, body.get("result") or body.get("state")

        with ThreadPoolExecutor(8) as pool:
            answers = {mid: (status, what) for mid, status, what in pool.map(cancel, order)}
        states = eventually(lambda: (s := ledger(admin, namespace, ids))
                            and set(s.values()) <= {"sent", "cancelled"} and s, timeout=60)
        cancelled = {m for m, s in states.items() if s == "cancelled"}
        sent_ids = set(ids) - cancelled
        sent = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.sent", expect=len(sent_ids), timeout=60)]
        schedule = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.schedule", expect=len(cancelled), timeout=60)]
        time.sleep(1.0)  # anything sent late would show at the server now
        delivered = Counter(str(m["Message-ID"]).strip("<>").split("@")[0]
                            for m in smtp.handler.messages())

    print(f"\n{N} messages: {len(cancelled)} cancelled, {len(sent_ids)} sent"
          f" (answers: {Counter(a for a in answers.values())})")
    # Both sides of the race happened, or the test proved nothing.
    assert cancelled and sent_ids
    for mid in ids:
        status, what = answers[mid]
        if mid in cancelled:
            assert (status, what) == (200, "cancelled"), mid
            assert delivered[mid] == 0, f"{mid} cancelled and delivered"
        else:
            assert status == 409 and what in ("sending", "sent"), (mid, status, what)
            assert delivered[mid] == 1, f"{mid} delivered {delivered[mid]} times"
    assert Counter(e["message_id"] for e in sent) == Counter(sent_ids)
    assert all(not e["possible_duplicate"] for e in sent)
    assert sorted(e["message_id"] for e in schedule) == sorted(cancelled)
    assert {e["change"] for e in schedule} == {"cancelled"}
    assert sum(delivered.values()) == len(sent_ids)
