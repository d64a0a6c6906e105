"""Every metric a dashboard or rule reads is one the services export: no silent empty panel."""

from __future__ import annotations

import importlib
import re

import pytest
from prometheus_client import REGISTRY

from mailbus.settings import REPO_ROOT

MODULES = ("mailbus.lag", "mailbus.ingest.metrics", "mailbus.sender.metrics",
           "mailbus.confirm.metrics", "mailbus.hooks.metrics", "mailbus.replies.metrics",
           "mailbus.webhooks.metrics")
SOURCES = sorted([*(REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"),
                  REPO_ROOT / "deploy" / "prometheus" / "rules.yml"])
NAME = re.compile(r"\b(mailbus_[a-z0-9_]+)")


def exported() -> set[str]:
    for module in MODULES:
        importlib.import_module(module)
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count")}
    for family in REGISTRY.collect():
        names |= {family.name, *(family.name + s for s in suffixes.get(family.type, ()))}
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_metric_read_is_exported(path) -> None:
    known = exported()
    read = set(NAME.findall(path.read_text()))
    assert read, f"{path.name} reads no mailbus metric"
    assert sorted(read - known) == []
