"""The request as a client writes it, with every limit it is held to."""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from mailbus import customheaders, topics
from mailbus.ingest import attachment_rules
from mailbus.ingest.attachment_rules import Attachment

MAX_RECIPIENTS = 100  # To + Cc + Bcc, as Gmail allows per message
MAX_SUBJECT = 998  # RFC 5322's line limit; longer subjects are folded anyway
MAX_NAME = 200
MAX_CONTENT_BYTES = 512 * 1024  # text + html + template, UTF-8; Kafka's record limit is 1 MB
MAX_VARIABLES_BYTES = 64 * 1024
MAX_ACTIONS = 10
MAX_TAGS = 20
MAX_METADATA = 20
MAX_BATCH = 1000
# The scheduling horizon; email.requested keeps its records a week longer.
MAX_SCHEDULE_AHEAD = timedelta(days=topics.SCHEDULE_HORIZON_DAYS)
# Any of these in a value that becomes a header would let input write headers.
_HEADER_BREAKERS = re.compile(r"[\r\n\0]")
# Header-bound fields also refuse every other control character and Unicode line
# separator (TAB alone is allowed: it is folded into a space)...
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
MAX_ADDRESS_TEXT = 512  # "Name <address>": a 200-character name and a 254-octet address fit

# validate_email without deliverability checks is a pure function of the text
# (no DNS, the library's defaults never change here), so its answer for a
# recent address is kept: recurring recipients skip the IDNA and Unicode
# checks, a tenth of a request's CPU. Bounded: the most recent EMAIL_CACHE
# texts, each at most EMAIL_CACHE_TEXT characters (an address has at most
# 254 octets; longer texts are checked, and refused, uncached).
EMAIL_CACHE = 2048
EMAIL_CACHE_TEXT = 320

Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
MetaKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


def no_header_breaks(value: str) -> str:
    """Refuse CR, LF and NUL in anything that becomes a header."""
    if _HEADER_BREAKERS.search(value):
        raise ValueError("must not contain CR, LF or NUL")
    return value


def has_encoded_word(value: str) -> bool:
    """Whether an "=?" is later followed by "?=": what could be an RFC 2047 encoded word.

    JSON carries Unicode, so a client never needs one, and mail libraries decode
    them when a header is written, turning "=?utf-8?q?hi=0D=0ABcc:...?=" into a
    second header line. This is wider than RFC 2047 on purpose: it covers every
    form a lenient decoder accepts (any case, charset*lang, glued to other text,
    whitespace inside, split across words). Two find()s, so linear in the length.
    """
    start = value.find("=?")
    return start >= 0 and value.find("?=", start + 2) >= 0


def header_value(value: str) -> str:
    """Refuse what could end or encode a header line: controls, U+2028/9, encoded words."""
    if _HEADER_CONTROLS.search(value):
        raise ValueError("must not contain line breaks or control characters"
                         " (CR, LF, NUL, U+0085, U+2028, U+2029...)")
    if has_encoded_word(value):
        raise ValueError("must not contain an RFC 2047 encoded word (=?...?=): send the text"
                         " itself, JSON carries Unicode")
    return value


def _validate_email(value: str) -> tuple[str | None, str | None]:
    try:
        # Syntax only (RFC 5322, IDN): no DNS lookups on the request path.
        return validate_email(value, check_deliverability=False).normalized, None
    except EmailNotValidError as exc:
        return None, str(exc)


_validate_email_kept = functools.lru_cache(maxsize=EMAIL_CACHE)(_validate_email)


def normalized_email(value: str) -> str:
    """The address in normal form (email_validator's syntax rules), ValueError naming why not."""
    check = _validate_email_kept if len(value) <= EMAIL_CACHE_TEXT else _validate_email
    normalized, error = check(value)
    if error is not None:
        raise ValueError(error)
    assert normalized is not None
    return normalized


def header_problems(headers: dict[str, str]) -> list[tuple[str, str]]:
    """(field, message) for each caller-chosen header that may not be sent, e.g.
    ("headers.X-Foo", ...); linear in the size of the headers."""
    problems: list[tuple[str, str]] = []
    if len(headers) > customheaders.MAX_HEADERS:
        return [("headers", f"at most {customheaders.MAX_HEADERS} headers")]
    size = sum(len(n.encode()) + len(v.encode()) for n, v in headers.items())
    if size > customheaders.MAX_BYTES:
        return [("headers", f"names and values together exceed {customheaders.MAX_BYTES} bytes")]
    seen: set[str] = set()
    for name, value in headers.items():
        field = f"headers.{name[:customheaders.MAX_NAME]}"
        problem = customheaders.name_problem(name)
        if problem is None and name.lower() in seen:
            problem = "given more than once (names are case-insensitive)"
        seen.add(name.lower())
        if problem is None:
            try:
                header_value(value)
            except ValueError as exc:
                problem = str(exc)
        text = " ".join(value.split())
        if problem is None and not text:
            problem = "must not be empty"
        if problem is None and len(text) > customheaders.MAX_VALUE:
            problem = f"must be at most {customheaders.MAX_VALUE} characters"
        keywords = customheaders.KEYWORDS.get(name.lower())
        if problem is None and keywords is not None and text.lower() not in keywords:
            problem = f"must be one of {', '.join(sorted(keywords))}"
        if problem is not None:
            problems.append((field, problem))
    return problems


class Address(BaseModel):
    """A mailbox: normalised address and an optional display name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    email: str
    name: str | None = Field(default=None, max_length=MAX_NAME)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = header_value(value).strip().strip('"').strip()
        return value or None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        header_value(value)
        return normalized_email(value)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        # "Grace Hopper <grace@example.com>" or a bare address.
        if isinstance(data, str):
            if len(data) > MAX_ADDRESS_TEXT:
                raise ValueError(f"must be at most {MAX_ADDRESS_TEXT} characters")
            header_value(data)
            # Split at the last "<" rather than with a regex: a lazy name group before
            # \s*< was quadratic on long runs of spaces.
            text = data.strip()
            name, bracket, addr = text[:-1].rpartition("<") if text.endswith(">") else ("", "", "")
            if bracket and not {"<", ">"} & set(name + addr) and addr.strip():
                return {"email": addr.strip(), "name": name.strip() or None}
            return {"email": text}
        return data


# A stored template's name (POST /v1/templates), as the templates table checks it.
TEMPLATE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
TemplateName = Annotated[str, StringConstraints(pattern=TEMPLATE_NAME_PATTERN)]
MAX_TEMPLATE_VERSION = 2**31 - 1  # the column is a PostgreSQL integer


def _template_version(value: Any) -> Any:
    # Checked before the union, so a refusal names `template.version` alone.
    if value is None or value == "latest":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not (
            1 <= value <= MAX_TEMPLATE_VERSION):
        raise ValueError(f'must be a version number from 1 to {MAX_TEMPLATE_VERSION}, '
                         'or "latest"')
    return value


class Template(BaseModel):
    """A template rendered by the sender in a sandbox, with its variables: its source
    (subject, text, html), or the name of a stored template and its version."""

    model_config = ConfigDict(extra="forbid")
    subject: str | None = Field(default=None, max_length=MAX_SUBJECT)
    text: str | None = None
    html: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    # Stored templates: the API reads the source of `name` at `version` (a
    # number, or "latest", the default) when it accepts the message.
    name: TemplateName | None = Field(
        default=None, description="A stored template of this key (POST /v1/templates), "
        "instead of subject, text and html. See docs/api.md, Stored templates.")
    version: Annotated[int | Literal["latest"] | None, BeforeValidator(_template_version)] = \
        Field(default=None, description="The stored template's version, or \"latest\" "
              "(the default when a name is given).")

    @model_validator(mode="after")
    def _stored_or_inline(self) -> Template:
        if self.name is not None and (self.subject is not None or self.text is not None
                                      or self.html is not None):
            raise ValueError("give either name (a stored template) or subject, text and html")
        if self.name is None and self.version is not None:
            raise ValueError("version needs a name")
        return self

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: Any) -> dict[str, Any]:
        # An inline template dumps as it did before stored templates existed,
        # so an Idempotency-Key's request digest stays the same.
        data: dict[str, Any] = handler(self)
        if self.name is None:
            data.pop("name", None)
            data.pop("version", None)
        return data

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else header_value(value)

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value).encode()) > MAX_VARIABLES_BYTES:
            raise ValueError(f"must encode to at most {MAX_VARIABLES_BYTES} bytes of JSON")
        return value


class Action(BaseModel):
    """An interactive choice rendered as a signed link or button."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
    label: str = Field(min_length=1, max_length=100)
    url: Annotated[str, StringConstraints(pattern=r"^https://[^\s\x00]{1,2000}$")] | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        return no_header_breaks(value)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        # Unsubscribe links have their own route; an action of that name
        # would make its signed link a second way to unsubscribe.
        if value == "unsubscribe":
            raise ValueError("'unsubscribe' is reserved")
        return value


class MessageRequest(BaseModel):
    """POST /v1/messages."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str | None = Field(default=None, alias="from", max_length=80)
    to: list[Address] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    cc: list[Address] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[Address] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    reply_to: Address | None = None
    subject: str | None = Field(default=None, max_length=MAX_SUBJECT)
    text: str | None = None
    html: str | None = None
    template: Template | None = None
    actions: list[Action] = Field(default_factory=list, max_length=MAX_ACTIONS)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA)
    send_at: AwareDatetime | None = None
    # name -> value; checked by header_problems (cross_field_problems), so each
    # refusal names its header. The count and size caps hold before that check.
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(f"Extra header fields, name -> value: X-... names (except reserved "
                     f"prefixes such as X-Mailbus-), Precedence (bulk, list, junk) and "
                     f"Auto-Submitted; at most {customheaders.MAX_HEADERS}, values of at most "
                     f"{customheaders.MAX_VALUE} characters on one line,"
                     f" {customheaders.MAX_BYTES} bytes in all. See docs/api.md, Custom headers."),
        json_schema_extra={"maxProperties": customheaders.MAX_HEADERS,
                           "examples": [{"X-Campaign": "spring-2026"}]})
    # Files: bytes inline (base64) or an uploaded file's id; see docs/api.md, Attachments.
    attachments: list[Attachment] = Field(
        default_factory=list, max_length=attachment_rules.MAX_ATTACHMENTS)

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(pool:)?[a-z0-9][a-z0-9_.-]{0,63}", value):
            raise ValueError("must be an account id or pool:NAME")
        return value

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else header_value(value)

    @field_validator("send_at")
    @classmethod
    def _send_at(cls, value: datetime | None) -> datetime | None:
        if value is not None and value - datetime.now(UTC) > MAX_SCHEDULE_AHEAD:
            raise ValueError(f"must be at most {MAX_SCHEDULE_AHEAD.days} days ahead")
        return value


def cross_field_problems(req: MessageRequest) -> list[tuple[str, str]]:
    """(field, message) for rules that span fields; empty when the request is whole."""
    problems: list[tuple[str, str]] = []
    if len(req.to) + len(req.cc) + len(req.bcc) > MAX_RECIPIENTS:
        problems.append(("to", f"at most {MAX_RECIPIENTS} recipients in to, cc and bcc together"))
    template = req.template
    if not (req.text or req.html or (template and (template.text or template.html))):
        problems.append(("text", "give text, html, or a template with text or html"))
    if req.subject is None and not (template and template.subject):
        problems.append(("subject", "give a subject, or a template with a subject"))
    bodies = [req.text, req.html]
    if template is not None:
        bodies += [template.text, template.html, template.subject]
    if sum(len(b.encode()) for b in bodies if b) > MAX_CONTENT_BYTES:
        problems.append(("text", f"text, html and template exceed {MAX_CONTENT_BYTES} bytes"))
    problems += header_problems(req.headers)
    if req.attachments:
        has_html = bool(req.html or (template and template.html))
        problems += attachment_rules.message_problems(req.attachments, has_html)
    return problems


class BatchRequest(BaseModel):
    """POST /v1/messages/batch: items are validated one by one, not all or nothing."""

    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


MAX_REASON = 200


class CancelRequest(BaseModel):
    """POST /v1/messages/{id}/cancel: an optional reason, kept in the event."""

    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str | None, Field(max_length=MAX_REASON)] = None

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str | None) -> str | None:
        return None if value is None else header_value(value)


class RescheduleRequest(CancelRequest):
    """POST /v1/messages/{id}/reschedule: the new earliest time to send."""

    send_at: AwareDatetime

    @field_validator("send_at")
    @classmethod
    def _new_send_at(cls, value: datetime) -> datetime:
        if value - datetime.now(UTC) > MAX_SCHEDULE_AHEAD:
            raise ValueError(f"must be at most {MAX_SCHEDULE_AHEAD.days} days ahead")
        return value
