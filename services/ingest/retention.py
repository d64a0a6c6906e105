"""Idempotency-Key records and attachments expire: each ingest process prunes them in the
background."""

from __future__ import annotations

import asyncio
import logging

import psycopg

from mailbus.ingest import attachments
from mailbus.ingest.problems import Problem
from mailbus.ingest.service import Ingestor

log = logging.getLogger(__name__)


async def prune_forever(ingestor: Ingestor, every_seconds: float, batch: int) -> None:
    """Delete expired records batch by batch until none is left, then wait; forever.

    A database outage only delays the next round: requests treat an expired
    record as gone whether or not it was deleted yet.
    """
    while True:
        try:
            total = 0
            while (deleted := await ingestor.prune(batch)) > 0:
                total += deleted
                if deleted < batch:
                    break
            if total:
                log.info("pruned %d expired idempotency record(s)", total)
            # Attachments: expired references, then the bytes none names (0017).
            references, blobs = await attachments.prune(ingestor, batch)
            if references or blobs:
                log.info("pruned %d expired attachment reference(s), %d file(s)",
                         references, blobs)
        except (Problem, psycopg.Error) as exc:
            log.warning("pruning (idempotency records, attachments) skipped this round: %s", exc)
        except Exception:  # a bug must not end pruning for the process's life
            log.exception("pruning (idempotency records, attachments) failed this round")
        await asyncio.sleep(every_seconds)
