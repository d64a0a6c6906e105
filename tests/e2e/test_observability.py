"""Monitoring as shipped: the Prometheus config and rules, and every Grafana query, on live data.

promtool checks deploy/prometheus/{prometheus,rules}.yml. Then the real
Prometheus binary scrapes this test's own pipeline (ingest in the test on a
real socket; sender, confirm, projector, hooks and replies as processes,
each serving /metrics on a free port), evaluating deploy/prometheus/rules.yml
every second, while mail flows through the API to an SMTP server in the test
and a recipient clicks a link and unsubscribes through the hooks service.
Every expression of every rule and every dashboard target is then sent to
Prometheus' query API: each must parse, and those the traffic moves must
return data. Panels on what this traffic does not cause (bounces, mail read
from a mailbox: the replies service here reads none) are checked for
parsing only. Last, the lag
reporter's arithmetic is checked against offsets committed by hand, read
with the sender's own Kafka principal (its ACLs suffice).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from mailbus import verify
from mailbus.ingest.settings import IngestSettings
from mailbus.lag import LAG, LagReporter
from mailbus.settings import ServiceSettings
from mailbus.tokens import Keyring, LinkBuilder
from tests.integration.conftest import LiveServer
from tests.support.processes import Services
from tests.support.sender import smtp_account
from tests.support.smtp import SmtpServer

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
COUNT = 20

# Grafana's template variables, as a dashboard with every account selected sends them.
VARIABLES = {"account": ".*", "__range": "1h", "__rate_interval": "1m", "__interval": "15s",
             "__range_s": "3600", "__interval_ms": "15000"}
# Expressions on these metrics must return data once mail has flowed.
MOVED = ("mailbus_sender_sent_total", "mailbus_ingest_messages_accepted_total",
         "mailbus_confirm_confirmed_total", "mailbus_sender_quota_used", "mailbus_consumer_lag",
         "mailbus_confirm_sent_to_delivered_seconds", "mailbus:sent:", "mailbus:accepted:",
         "mailbus:confirmed:", "mailbus:quota:", 'kind="delivered"',
         "mailbus_hooks_responses_recorded_total", "mailbus_hooks_requests_total")
# Not moved by this traffic (no bounces, responses, failures), or not exported yet.
PARSE_ONLY = ("mailbus_replies_", 'kind="bounced"', 'kind="response"')

pytestmark = pytest.mark.skipif(
    not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()),
    reason="prometheus and promtool are not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def substitute(expr: str) -> str:
    """Replace Grafana's $name and ${name} with concrete values."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"unknown template variable ${name} in {expr!r}")
        return VARIABLES[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel of every dashboard."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = list(dashboard["panels"])
        while panels:
            panel = panels.pop()
            panels += panel.get("panels", [])  # rows
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} {target['refId']}",
                              target["expr"]))
    return found


def rule_exprs() -> list[tuple[str, str, bool]]:
    """(where, expr, is_alert) for every rule."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [(f"rules.yml: {rule.get('record') or rule.get('alert')}", str(rule["expr"]),
             "alert" in rule)
            for group in rules["groups"] for rule in group["rules"]]


def wait_for(what: str, check: Callable[[], Any], deadline: float,
              alive: Callable[[], None] = lambda: None) -> Any:
    end = time.monotonic() + deadline
    while True:
        alive()
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def test_promtool_accepts_the_config_and_the_rules():
    config = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run([PROMTOOL, "check", "rules", str(PROMETHEUS_DIR / "rules.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"]
               for c in shipped["scrape_configs"]}
    assert targets == {"ingest": ["127.0.0.1:8080"], "sender": ["127.0.0.1:9101"],
                       "confirm": ["127.0.0.1:9102"], "projector": ["127.0.0.1:9103"],
                       "hooks": ["127.0.0.1:9104"], "replies": ["127.0.0.1:9105"],
                       "webhooks": ["127.0.0.1:9106"]}


class Prometheus:
    """The real Prometheus binary on a free port, with its data in a temporary folder."""

    def __init__(self, tmp: Path, targets: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "rules.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }))
        self.log = tmp / "prometheus.log"
        self.data = tmp / "tsdb"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def __enter__(self) -> Prometheus:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for("Prometheus to be ready", self._ready, 30, self.check_alive)
        return self

    def _ready(self) -> bool:
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-3000:]}")

    def query(self, expr: str) -> dict[str, Any]:
        """The API's answer to an instant query (a parse error is status "error")."""
        return self.client.get("/api/v1/query", params={"query": expr}).json()  # type: ignore[no-any-return]

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_every_rule_and_panel_query_runs_on_live_metrics(namespace, tmp_path: Path, make_key):
    _, token = make_key(scopes=("send", "read"))
    ports = {name: free_port() for name in ("sender", "confirm", "projector", "hooks",
                                             "replies")}
    hooks_port = free_port()
    with SmtpServer() as smtp:
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(smtp_account("dev", smtp.port, rate=500, quota=1000))
        env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
               "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "keys"), "MAILBUS_POLL_SECONDS": "0.2",
               "MAILBUS_LOG_LEVEL": "WARNING", "MAILBUS_LAG_SECONDS": "1"}
        settings = IngestSettings(accounts_file=accounts, kafka={"topic_prefix": namespace})
        with Services(env, tmp_path) as services, LiveServer(settings) as api:
            for name, port in ports.items():
                services.start(name, MAILBUS_METRICS_PORT=str(port),
                               MAILBUS_PORT=str(hooks_port))
            targets = {"ingest": f"127.0.0.1:{api.port}"} | {
                name: f"127.0.0.1:{port}" for name, port in ports.items()}
            with Prometheus(tmp_path, targets) as prom:
                def alive() -> None:
                    services.check_alive()
                    prom.check_alive()

                def all_up() -> bool:
                    up = {s["metric"]["job"]: s["value"][1] for s in prom.series("up")}
                    return up == {job: "1" for job in targets}

                wait_for("every target scraped and up", all_up, 90, alive)
                verifier = verify.Verifier(api.url, token)
                try:
                    outcome = verify.run(verifier, count=COUNT, recipients=["obs@example.com"],
                                         deadline=120, poll=0.5, progress=lambda *_: alive())
                finally:
                    verifier.close()
                assert outcome.ok, (outcome.count(), services.tail("confirm"))
                assert len(smtp.handler.received) == COUNT
                # A recipient answers through the public links of the first message.
                links = LinkBuilder(Keyring.from_file(tmp_path / "keys"),
                                    f"http://127.0.0.1:{hooks_port}")
                now = datetime.now(UTC)
                with httpx.Client(timeout=30) as browser:
                    for url in (links.action_url(outcome.ids[0], "obs@example.com", "yes",
                                                 now=now),
                                links.unsubscribe_url(outcome.ids[0], "obs@example.com",
                                                      now=now)):
                        assert browser.post(url).status_code == 200

                def scraped(expr: str, at_least: float) -> Callable[[], bool]:
                    return lambda: any(float(s["value"][1]) >= at_least
                                       for s in prom.series(expr))

                group = namespace + "mailbus-sender"
                for what, expr, value in [
                    ("confirmations", "sum(mailbus_confirm_confirmed_total)", COUNT),
                    ("sends", 'sum(mailbus_sender_sent_total{account="dev"})', COUNT),
                    ("accepts", 'sum(mailbus_ingest_messages_accepted_total{account="dev"})',
                     COUNT),
                    ("quota used", 'mailbus_sender_quota_used{account="dev"}', COUNT),
                    ("projected deliveries",
                     'sum(mailbus_projector_events_total{kind="delivered"})', COUNT),
                    # rate() needs two scrapes of a series that the clicks just made.
                    ("link responses", 'count(rate(mailbus_hooks_responses_recorded_total'
                                       '{kind=~"action|unsubscribe"}[1m]))', 2),
                    ("hook requests", 'count(rate(mailbus_hooks_requests_total[1m]))', 2),
                    ("the recording rule", 'mailbus:sent:increase24h{account="dev"}', 0),
                    # Lag of every group is measured (0 once caught up).
                    ("sender lag", f'count(mailbus_consumer_lag{{group="{group}"}})', 12),
                    ("confirm lag",
                     f'count(mailbus_consumer_lag{{group="{namespace}mailbus-confirm"}})', 24),
                    ("projector lag",
                     f'count(mailbus_consumer_lag{{group="{namespace}mailbus-projector"}})',
                     12 + 6 * 6),
                ]:
                    wait_for(f"{what} in Prometheus", scraped(expr, value), 60, alive)

                failures = []
                exprs = [(w, e, False) for w, e in dashboard_exprs()] + rule_exprs()
                assert len(exprs) > 30
                for where, raw, is_alert in exprs:
                    expr = substitute(raw)
                    answer = prom.query(expr)
                    if answer.get("status") != "success":
                        failures.append(f"{where}: does not run: {answer.get('error')}: {expr}")
                        continue
                    must_move = (not is_alert and any(m in expr for m in MOVED)
                                 and not any(p in expr for p in PARSE_ONLY))
                    if must_move and not answer["data"]["result"]:
                        failures.append(f"{where}: no data: {expr}")
                assert not failures, "\n".join(failures)
                # Nothing is down, and this test's account is not near its quota (20 of
                # 1000). The API runs in the test's process, whose default registry also
                # holds the quota gauges of in-process senders that earlier tests in the
                # same worker ran (their accounts, not "dev"), so the quota alert is read
                # for "dev" only.
                # One scrape over its 1 s timeout on a loaded machine makes a pending
                # ServiceDown for a moment; a target really down keeps it pending.
                wait_for("no MailbusServiceDown, pending or firing",
                         lambda: prom.series('ALERTS{alertname="MailbusServiceDown"}') == [],
                         30, alive)
                assert prom.series('ALERTS{alertname="MailbusAccountNearQuota",'
                                   'account="dev"}') == []


def test_lag_reporter_reads_a_group_with_the_services_own_principal(namespace, admin_kafka):
    sender = ServiceSettings(service_name="sender", kafka={"topic_prefix": namespace})
    group, topic = namespace + "mailbus-sender", namespace + "email.requested"
    producer = Producer({**admin_kafka, "partitioner": "murmur2"})
    for i in range(10):
        producer.produce(topic, key=b"acct", value=str(i).encode())
    assert producer.flush(30) == 0
    reporter = LagReporter(sender.kafka.client_config(), group, [topic])
    try:
        lag = reporter.measure()
        assert len(lag) == 12 and sum(lag.values()) == 10  # nothing committed yet
        [(partition, _)] = [(p, n) for (_, p), n in lag.items() if n]
        committer = Consumer({**admin_kafka, "group.id": group})
        committer.commit(offsets=[TopicPartition(topic, partition, 7)], asynchronous=False)
        committer.close()
        assert reporter.refresh()
        value = LAG.labels(group, topic, str(partition))._value.get()
        assert value == 3
    finally:
        reporter.close()
