"""Kafka provisioning: topics, one SCRAM principal per service, and their ACLs.

Run with the cluster's admin principal. Every step is idempotent: topics
that exist keep their partitions and get the table's configs, passwords
come from files written on first run, ACL creation of an existing binding
is a no-op in Kafka, and a service principal's bindings beyond its grant
are removed.
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
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from mailbus.db import ensure_secret_file
from mailbus.errors import ProvisioningError
from mailbus.topics import GRANTS, RETIRED, TOPICS, Grant

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


def ensure_topic_configs(admin: AdminClient, prefix: str = "") -> list[str]:
    """Bring existing topics' configs to the table's (a retention raised in a release
    reaches an installation made before it); returns the topics changed."""
    existing = set(admin.list_topics(timeout=TIMEOUT).topics)
    specs = {prefix + spec.name: spec for spec in TOPICS if prefix + spec.name in existing}
    if not specs:
        return []
    described = admin.describe_configs(
        [ConfigResource(ConfigResource.Type.TOPIC, name) for name in specs],
        request_timeout=TIMEOUT)
    changes = []
    for resource, future in described.items():
        current = future.result()
        wanted = specs[resource.name].config
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                   for k, v in sorted(wanted.items())
                   if k in current and current[k].value != v]
        if entries:
            changes.append(ConfigResource(ConfigResource.Type.TOPIC, resource.name,
                                          incremental_configs=entries))
    if not changes:
        return []
    # Incremental: only the named keys change, every other setting stays.
    for resource, future in admin.incremental_alter_configs(
            changes, request_timeout=TIMEOUT).items():
        future.result()
        log.info("kafka: topic %s config set to the table's", resource.name)
    return sorted(r.name for r in changes)


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
    """Make every service's ACLs in the namespace exactly its grant; wait until applied.

    Bindings a service principal holds on the namespace's resources beyond
    its grant (a grant trimmed since the last run) are deleted, so a
    narrower grant takes effect on an existing install too.
    """
    wanted = [b for service, grant in GRANTS.items() for b in bindings(service, grant, prefix)]
    for future in admin.create_acls(wanted, request_timeout=TIMEOUT).values():
        future.result()
    wanted_keys = set(map(_acl_key, wanted))
    stale = [b for b in _all_acls(admin)
             if _acl_key(b) not in wanted_keys and _managed(b, prefix)]
    if stale:
        filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal,
                                    b.host, b.operation, b.permission_type) for b in stale]
        for future in admin.delete_acls(filters, request_timeout=TIMEOUT).values():
            future.result()
        log.info("kafka: %d ACL binding(s) beyond the grants removed", len(stale))
    # CreateAcls and DeleteAcls return once the controller committed the
    # records; brokers apply the metadata log a moment later, and a client
    # that starts in between is refused (or still allowed). Wait until the
    # broker's authorizer lists exactly what the grants say.
    deadline = time.monotonic() + TIMEOUT
    gone = set(map(_acl_key, stale))
    while True:
        listed = set(map(_acl_key, _all_acls(admin)))
        missing, lingering = wanted_keys - listed, gone & listed
        if not missing and not lingering:
            return len(wanted)
        if time.monotonic() > deadline:
            raise ProvisioningError(f"{len(missing)} ACL binding(s) not applied and"
                                    f" {len(lingering)} not removed in {TIMEOUT} s")
        time.sleep(0.1)


def _all_acls(admin: AdminClient) -> list[AclBinding]:
    # None matches any name, principal and host; the stubs do not say so.
    every = AclBindingFilter(ResourceType.ANY, None,  # type: ignore[arg-type]
                             ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
                             AclOperation.ANY, AclPermissionType.ANY)
    return list(admin.describe_acls(every).result(TIMEOUT))


def _managed(b: AclBinding, prefix: str) -> bool:
    """True for a binding of a service principal on one of this namespace's resources.

    Other principals' ACLs (an operator's monitoring user) are left alone, and
    so are other namespaces': the names are matched exactly, so with no prefix
    "t1a2b.email.sent" or "mailbus-staging-email.sent" is not ours.
    """
    principals = {f"User:{service}" for service in GRANTS}
    names = {prefix + name for name in (
        *(spec.name for spec in TOPICS), *RETIRED,
        *(g for grant in GRANTS.values() for g in (*grant.groups, *grant.owned_prefixes)))}
    return b.principal in principals and b.name in names


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
    reconfigured = ensure_topic_configs(admin, prefix)
    acls = ensure_acls(admin, prefix)
    log.info("kafka: %d topic(s) created, %d reconfigured, %d ACL binding(s) ensured",
             len(created), len(reconfigured), acls)
    return {"topics_created": created, "topics_reconfigured": reconfigured, "acls": acls}
