"""The kept answers of email_validator are its answers: same address, same verdict, same words."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email

from mailbus.ingest import models
from mailbus.ingest.models import Address, normalized_email

ADDRESSES = [
    "ada@example.com", "Ada@Example.COM", "postmaster@EXAMPLE.com", "ünïcode@exämple.org",
    "a.b+c@sub.example.co.uk", '"quoted local"@example.com', "x@[127.0.0.1]", "no-at-sign",
    "two@@example.com", "dot.@example.com", "a@-bad-.com", "a@localhost", "a@example",
    "a@invalid", "a@xn--nxasmq6b.com", "a@xn--zz.com", "a@exa_mple.com", "",
    "a" * 65 + "@example.com", "a@" + "b" * 250 + ".com", "a@example.com.", "a @example.com",
]


def direct(text: str) -> tuple[str | None, str | None]:
    try:
        return validate_email(text, check_deliverability=False).normalized, None
    except EmailNotValidError as exc:
        return None, str(exc)


@pytest.mark.parametrize("text", ADDRESSES)
def test_kept_answer_is_the_libraries_answer_every_time(text):
    expected = direct(text)
    for _ in range(3):  # the first from email_validator, the next from the cache
        try:
            got: tuple[str | None, str | None] = (normalized_email(text), None)
        except ValueError as exc:
            got = (None, str(exc))
        assert got == expected, text


def test_the_model_refuses_and_normalises_as_before():
    assert Address.model_validate("Ada <Ada@Example.COM>").email == "Ada@example.com"
    for _ in range(2):
        with pytest.raises(ValueError, match="An email address must have an @-sign"):
            Address.model_validate("no-at-sign")


def test_long_texts_are_never_kept_and_the_cache_is_bounded():
    models._validate_email_kept.cache_clear()
    long_text = "a" * models.EMAIL_CACHE_TEXT + "@example.com"
    with pytest.raises(ValueError):
        normalized_email(long_text)
    assert models._validate_email_kept.cache_info().currsize == 0
    for i in range(models.EMAIL_CACHE + 50):
        normalized_email(f"user{i}@example.com")
    assert models._validate_email_kept.cache_info().currsize == models.EMAIL_CACHE
