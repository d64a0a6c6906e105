"""The pure rules of replays: targets, speeds, pacing, resuming."""

from __future__ import annotations

import pytest

from mailbus import recording, replay
from mailbus.recording import Recorded, RecordingError


def rec(offset: int, stamp: int, topic: str = "email.sent", partition: int = 0) -> Recorded:
    return Recorded(topic, partition, offset, stamp, b"k", (), b"v")


@pytest.mark.parametrize("name", ["", ".", "a.b", "-x", "x" * 65, "a b", "ns/evil", "é"])
def test_bad_namespaces_are_refused(name: str) -> None:
    with pytest.raises(replay.ReplayRefused):
        replay.target_prefix(name, "")


def test_the_live_namespace_needs_the_flag() -> None:
    assert replay.target_prefix("test-1", "") == "test-1."
    with pytest.raises(replay.ReplayRefused):
        replay.target_prefix("prod", "prod.")
    assert replay.target_prefix("ignored", "prod.", into_live=True) == "prod."


@pytest.mark.parametrize(("text", "speed"), [("recorded", 1.0), ("max", None), ("10x", 10.0),
                                             ("0.5", 0.5), (" MAX ", None)])
def test_speeds(text: str, speed: float | None) -> None:
    assert replay.parse_speed(text) == speed


@pytest.mark.parametrize("text", ["fast", "0", "-2x", "nan", "inf"])
def test_bad_speeds(text: str) -> None:
    with pytest.raises(replay.ReplayRefused):
        replay.parse_speed(text)


def test_pacing_keeps_gaps_divided_by_the_speed_and_caps_them() -> None:
    records = [rec(0, 1000), rec(1, 3000), rec(2, 2500), rec(3, 3500), rec(4, 10_000_000)]
    waits = [w for w, _ in replay.paced(records, 2.0)]
    # A record older than the last one does not wait (partitions interleave).
    assert waits == [0.0, 1.0, 0.0, 0.25, replay.MAX_GAP_SECONDS]
    assert all(w == 0 for w, _ in replay.paced(records, None))


def test_sources_round_trip_and_resume_skips_up_to_the_highest() -> None:
    r = rec(41, 0, topic="email.requested", partition=7)
    assert replay.parse_source(replay.source_of(r).encode()) == ("email.requested", 7, 41)
    for bad in (None, b"", b"x", b"t/1/x", b"t/x/1", b"/1/2"):
        assert replay.parse_source(bad) is None
    done = replay.already_written([("email.requested", 7, 3), ("email.requested", 7, 41),
                                   ("email.sent", 0, 5)])
    assert replay.is_written(rec(41, 0, "email.requested", 7), done)
    assert not replay.is_written(rec(42, 0, "email.requested", 7), done)
    assert not replay.is_written(rec(0, 0, "email.requested", 6), done)


def test_times() -> None:
    assert recording.since_from("2026-11-30T00:00:00Z") == 1795996800000
    assert recording.since_from("2h", now=10_000.0) == 10_000_000 - 7_200_000
    for bad in ("yesterday", "2026-11-30T00:00:00", "5w"):
        with pytest.raises(RecordingError):
            recording.since_from(bad)


def test_a_file_that_is_not_a_recording_is_refused(tmp_path) -> None:
    path = tmp_path / "x.avro"
    path.write_bytes(b"not avro at all")
    with pytest.raises(RecordingError):
        recording.read(path)


def test_the_report_compares_each_replayed_message_with_its_original() -> None:
    from mailbus.replay_report import compare

    original = {"m1": ("dev", "confirmed"), "m2": ("dev", "failed"), "m3": ("b", "confirmed"),
                "m9": ("dev", "confirmed")}  # not replayed: not compared
    same = compare(original, {"m1": ("dev", "confirmed"), "m2": ("dev", "failed")})
    assert same.same and same.original == same.replayed
    assert same.replayed[("dev", "confirmed")] == 1

    changed = compare(original, {"m1": ("dev", "confirmed"), "m3": ("b", "sent"),
                                 "m4": ("dev", "confirmed")})
    assert not changed.same
    assert changed.differing == [("m3", ("b", "confirmed"), ("b", "sent")),
                                 ("m4", None, ("dev", "confirmed"))]
    assert changed.original[("b", "confirmed")] == 1 and changed.replayed[("b", "sent")] == 1
