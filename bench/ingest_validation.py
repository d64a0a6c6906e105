"""The single-message body's parse and validation, in this process, ways side by side.

  route       what FastAPI's route does: `json.loads`, then the model from the dict
  fast        what the fast path does: `MessageRequest.model_validate_json`
  ... misses  every message to a new recipient: email_validator runs for each
  ... repeats one recipient throughout: its verdict comes from the kept answers

The same bench message as ingest_throughput.py. Printed: microseconds of
CPU (process time) per message, best of `--rounds` rounds, and the share of
the fast, missing row spent in email_validator itself.

Usage: .venv/bin/python bench/ingest_validation.py [--messages 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ingest_throughput import MESSAGE  # noqa: E402

from mailbus.ingest import models  # noqa: E402
from mailbus.ingest.models import MessageRequest  # noqa: E402


def per_message_us(parse: Callable[[bytes], object], bodies: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        models._validate_email_kept.cache_clear()
        start = time.process_time()
        for body in bodies:
            parse(body)
        best = min(best, (time.process_time() - start) / len(bodies))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    distinct = [json.dumps({**MESSAGE, "to": [f"Ada Lovelace <ada{i}@example{i % 97}.com>"]}
                           ).encode() for i in range(args.messages)]
    same = [json.dumps(MESSAGE).encode()] * args.messages

    def route(body: bytes) -> object:
        return MessageRequest.model_validate(json.loads(body), from_attributes=True)

    fast = MessageRequest.model_validate_json
    rows = [("route", "misses", route, distinct), ("route", "repeats", route, same),
            ("fast", "misses", fast, distinct), ("fast", "repeats", fast, same)]
    print(f"{'parse':<6} {'recipients':<10} {'us/message':>10}")
    for name, kind, parse, bodies in rows:
        print(f"{name:<6} {kind:<10} {per_message_us(parse, bodies, args.rounds):>10.1f}")
    alone = per_message_us(lambda b: models._validate_email(b.decode()),
                           [f"ada{i}@example{i % 97}.com".encode() for i in range(args.messages)],
                           args.rounds)
    print(f"email_validator alone, per address: {alone:.1f} us")


if __name__ == "__main__":
    main()
