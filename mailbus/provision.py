"""Kafka provisioning: topics, one SCRAM principal per service, and their ACLs.

Run with the cluster's admin principal. Every step is idempotent: topics
that exist are left alone, passwords come from files written on first run,
and ACL creation of an existing binding is a no-op in Kafka.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from mailbus.db import ensure_secret_file
from mailbus.errors import ProvisioningError
from mailbus.topics import GRANTS, TOPICS, Grant

log = logging.getLogger(__name__)
TIMEOUT = 30.0
# Kafka's recommended minimum for SCRAM-SHA-512 is 4096 iterations.
SCRAM_ITERATIONS = 8192


def ensure_topics(admin: AdminClient, prefix: str = "") -> list[str]:
    """Create the pipeline's topics that do not exist yet; returns those created."""
    existing = set(admin.list_topics(timeout=TIMEOUT).topics)
    wanted = [
        NewTopic(prefix + spec.name, spec.partitions, 1, config=dict(spec.config))
        for spec in TOPICS
        if prefix + spec.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=TIMEOUT).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def ensure_users(admin: AdminClient, secrets_dir: Path, services: tuple[str, ...]) -> None:
    """Give each service a SCRAM-SHA-512 credential; its password lives in secrets_dir."""
    upserts = [
        UserScramCredentialUpsertion(
            name,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS),
            ensure_secret_file(secrets_dir / f"kafka-{name}.password").encode(),
        )
        for name in services
    ]
    # The stubs declare the base class only, in an invariant list.
    for future in admin.alter_user_scram_credentials(upserts).values():  # type: ignore[arg-type]
        future.result(TIMEOUT)


def bindings(service: str, grant: Grant, prefix: str = "") -> list[AclBinding]:
    """The ACLs of one service principal: exactly what its Grant names."""
    principal = f"User:{service}"

    def acl(rtype: ResourceType, name: str, op: AclOperation,
            pattern: ResourcePatternType = ResourcePatternType.LITERAL) -> AclBinding:
        return AclBinding(rtype, name, pattern, principal, "*", op, AclPermissionType.ALLOW)

    out: list[AclBinding] = []
    for topic in grant.read:
        out += [acl(ResourceType.TOPIC, prefix + topic, AclOperation.READ),
                acl(ResourceType.TOPIC, prefix + topic, AclOperation.DESCRIBE)]
    for topic in grant.write:
        # WRITE on a topic also allows the idempotent producer (KIP-679).
        out += [acl(ResourceType.TOPIC, prefix + topic, AclOperation.WRITE),
                acl(ResourceType.TOPIC, prefix + topic, AclOperation.DESCRIBE)]
    for group in grant.groups:
        out += [acl(ResourceType.GROUP, prefix + group, AclOperation.READ),
                acl(ResourceType.GROUP, prefix + group, AclOperation.DESCRIBE)]
    for owned in grant.owned_prefixes:
        out += [acl(ResourceType.TOPIC, prefix + owned, AclOperation.ALL,
                    ResourcePatternType.PREFIXED),
                acl(ResourceType.GROUP, prefix + owned, AclOperation.ALL,
                    ResourcePatternType.PREFIXED)]
    # A topic both read and written needs its DESCRIBE once.
    return list(dict.fromkeys(out))


def ensure_acls(admin: AdminClient, prefix: str = "") -> int:
    """Create every service's ACLs and wait until the authorizer applies them."""
    wanted = [b for service, grant in GRANTS.items() for b in bindings(service, grant, prefix)]
    for future in admin.create_acls(wanted, request_timeout=TIMEOUT).values():
        future.result()
    # CreateAcls returns once the controller committed the records; brokers
    # apply the metadata log a moment later, and a client that starts in
    # between is refused. Wait until the broker's authorizer lists them all.
    # None matches any name, principal and host; the stubs do not say so.
    every = AclBindingFilter(ResourceType.ANY, None,  # type: ignore[arg-type]
                             ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
                             AclOperation.ANY, AclPermissionType.ANY)
    deadline = time.monotonic() + TIMEOUT
    missing = set(map(_acl_key, wanted))
    while missing:
        missing -= set(map(_acl_key, admin.describe_acls(every).result(TIMEOUT)))
        if missing and time.monotonic() > deadline:
            raise ProvisioningError(f"{len(missing)} ACL binding(s) not applied in {TIMEOUT} s")
        if missing:
            time.sleep(0.1)
    return len(wanted)


def _acl_key(b: AclBinding) -> tuple[Any, ...]:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.operation,
            b.permission_type)


def provision(admin_config: dict[str, Any], secrets_dir: Path, prefix: str = "",
              users: bool = True) -> dict[str, Any]:
    """Topics, users and ACLs for one namespace (prefix); returns what was done."""
    admin = AdminClient(admin_config)
    if users:
        ensure_users(admin, secrets_dir, tuple(GRANTS))
    created = ensure_topics(admin, prefix)
    acls = ensure_acls(admin, prefix)
    log.info("kafka: %d topic(s) created, %d ACL binding(s) ensured", len(created), acls)
    return {"topics_created": created, "acls": acls}
