"""One reading of Google's errors (mailbus/gmail.py), turned into each caller's own errors.

The sender's transport reports SendErrors to its scheduler; the replies
inbox reports ReadErrors, which are not SendErrors. Both must mean the same
for the same answer: a limit waits, a refused request is not retried as it
is, everything else backs off and retries.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import google.auth.exceptions
import httplib2
import pytest
from googleapiclient.errors import HttpError
from httplib2 import Response

from mailbus.gmail import DAILY_PARK, RATE_WAIT, RATE_WAIT_CAP, failure
from mailbus.replies.gmail_inbox import (
    ReadError,
    ReadLimited,
    ReadRefused,
    ReadUnavailable,
    read_error,
)
from mailbus.sender.gmail import classify_api_error
from mailbus.sender.transport import AccountExhausted, PermanentError, SendError, TransientError

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def http_error(status: int, reason: str, message: str) -> HttpError:
    body = {"error": {"code": status, "message": message,
                      "errors": [{"reason": reason, "message": message}]}}
    return HttpError(Response({"status": status}), json.dumps(body).encode())


ANSWERS = [
    (http_error(429, "rateLimitExceeded", "Too many concurrent requests for user"),
     "rate_limit", None),
    (http_error(403, "dailyLimitExceeded", "Daily Limit Exceeded"), "sending_limit", None),
    (http_error(400, "invalidArgument", "Invalid label"), "refused", 400),
    (http_error(413, "uploadTooLarge", "Request Entity Too Large"), "refused", 413),
    (http_error(400, "failedPrecondition", "Precondition check failed."), "error", 400),
    (http_error(404, "notFound", "Requested entity was not found."), "error", 404),
    (HttpError(Response({"status": 502}), b"<html>Bad Gateway</html>"), "error", 502),
    (google.auth.exceptions.RefreshError("invalid_grant"), "credentials", 401),
    (httplib2.ServerNotFoundError("no such host"), "unreachable", None),
    (TimeoutError("timed out"), "unreachable", None),
    (ValueError("surprise"), "unexpected", None),
]


@pytest.mark.parametrize(("exc", "kind", "code"), ANSWERS)
def test_each_answer_is_read_once(exc: Exception, kind: str, code: int | None) -> None:
    found = failure(exc, NOW)
    assert (found.kind, found.code) == (kind, code)


def test_limits_say_when_to_try_again() -> None:
    daily = failure(http_error(403, "dailyLimitExceeded", "Daily Limit Exceeded"), NOW)
    assert daily.until == NOW + DAILY_PARK and daily.retry_after is None
    rate = failure(http_error(429, "rateLimitExceeded", "slow down"), NOW)
    assert rate.retry_after == RATE_WAIT and rate.until is None
    far = http_error(429, "rateLimitExceeded", "slow down")
    far.resp["retry-after"] = "86400"
    assert failure(far, NOW).retry_after == RATE_WAIT_CAP
    past = http_error(429, "rateLimitExceeded", "User-rate limit exceeded.  Retry after"
                      " 2029-12-31T23:00:00.000Z (Mail sending)")
    assert failure(past, NOW).until == NOW + timedelta(minutes=1)


SENDER = {"rate_limit": AccountExhausted, "sending_limit": AccountExhausted,
          "refused": PermanentError}
INBOX = {"rate_limit": ReadLimited, "sending_limit": ReadLimited, "refused": ReadRefused}


@pytest.mark.parametrize(("exc", "kind", "code"), ANSWERS)
def test_the_sender_and_the_inbox_mean_the_same_by_each_answer(
        exc: Exception, kind: str, code: int | None) -> None:
    sent, read = classify_api_error(exc, NOW), read_error(failure(exc, NOW))
    assert type(sent) is SENDER.get(kind, TransientError)
    assert type(read) is INBOX.get(kind, ReadUnavailable)
    assert str(sent) == str(read)
    assert getattr(sent, "code", None) == read.code == code
    assert getattr(sent, "retry_after", None) == read.retry_after


def test_read_errors_are_not_send_errors() -> None:
    assert not issubclass(ReadError, SendError)
    assert not issubclass(SendError, ReadError)
