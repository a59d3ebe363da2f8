"""Deployment artefacts checked with the real tools, offline: promtool (config, rules, rule unit tests),
kustomize (`kubectl kustomize` or the kustomize binary) + Kubernetes JSON schemas (kubernetes-validate) + the
KEDA / Prometheus Operator CRD schemas in deploy/k8s/crds (jsonschema), hadolint, and the Grafana dashboard's
and the alert rules' metric names against a live /metrics scrape of a running server.

No container engine runs here, so the images are not built; what the Dockerfile installs is pinned to what CI
installs instead (test_dockerfile_installs_what_ci_installs).

`python tests/test_deploy.py sync-rules` rewrites the Operator's PrometheusRule from deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "external-redis")
REQUIRE = bool(os.environ.get("DIFFSERVE_REQUIRE_SERVICES"))
# Kubernetes versions the manifests must validate against: native gRPC probes are stable from 1.27.
K8S_VERSIONS = ("1.27.0", "1.37.0")
HEALTH_SERVICE = "diffserve.v1.Diffserve"
JOBS = {"server": "diffserve-server", "worker": "diffserve-worker"}


def _tool(name: str) -> str:
    """The path of an installed tool, or skip (fail in CI, where .ci/run installs it)."""
    path = shutil.which(name) or (shutil.which(name, path=str(Path(sys.executable).parent)))
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} is not installed but DIFFSERVE_REQUIRE_SERVICES is set (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------------- Prometheus

def test_promtool_checks_config_and_rules():
    promtool = _tool("promtool")
    for cmd in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        out = _run([promtool, *cmd], cwd=DEPLOY / "prometheus")
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass_and_can_fail(tmp_path):
    promtool = _tool("promtool")
    out = _run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in _yaml(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]
              for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert {"DiffserveServerDown", "DiffserveHighErrorRatio", "DiffserveDeadLetterNotEmpty",
            "DiffserveNoWorkersWhileJobsWait"} <= tested
    # The same tests against a rule with a loosened threshold must fail: the unit tests do test something.
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text().replace(") > 0.05", ") > 0.5")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(DEPLOY / "prometheus" / "alerts_test.yml", tmp_path)
    out = _run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert out.returncode != 0 and "DiffserveHighErrorRatio" in out.stdout + out.stderr


def test_alert_rules_cover_the_issue():
    names = {r["alert"] for g in _yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]}
    assert {"DiffserveServerDown", "DiffserveHighErrorRatio", "DiffserveP99LatencyHigh", "DiffserveQueueLagGrowing",
            "DiffserveDeadLetterNotEmpty", "DiffserveNoWorkersWhileJobsWait"} <= names


def test_scrape_jobs_match_compose_and_podmonitor():
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(JOBS.values()) <= set(jobs)
    assert jobs["diffserve-server"]["static_configs"][0]["targets"] == ["server:9464"]
    dns = jobs["diffserve-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == _flag(_compose()["services"]["worker"]["command"],
                                                               "--metrics-port")
    # The Operator's PodMonitor names its jobs the same way, so one set of rules and one dashboard serve both.
    monitor = _yaml(K8S / "components" / "monitoring" / "podmonitor.yaml")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "diffserve-$1"
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]


def _rule_from_alerts() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "diffserve", "labels": {"app.kubernetes.io/name": "diffserve"}},
            "spec": _yaml(DEPLOY / "prometheus" / "alerts.yml")}


def test_prometheus_rule_for_the_operator_equals_alerts_yml():
    rule = _yaml(K8S / "components" / "monitoring" / "prometheus-rule.yaml")
    assert rule == _rule_from_alerts(), "run `python tests/test_deploy.py sync-rules`"


# ---------------------------------------------------------------------------------------- live metric names

@contextmanager
def _queue_figures_exported():
    """The job queue's shared figures (jobs by state, stream length, lag, pending, dead letters, workers) are
    collected from Redis at scrape time: point the collector at a JobStore on a real redis-server."""
    from server import queue_metrics
    from server.queue.store import JobStore

    redis_server = _tool("redis-server")
    with tempfile.TemporaryDirectory() as data:
        port = _free_port()
        proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
                                 "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            store = _wait_for(lambda: JobStore(f"redis://127.0.0.1:{port}/0", "deploytest"))
            queue_metrics.watch(store)
            yield
        finally:
            queue_metrics.COLLECTOR.store = None
            proc.terminate()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(make, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = make()
            value.stats()
            return value
        except Exception:  # noqa: BLE001 - redis-server still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@cache
def _exported_metric_names() -> frozenset[str]:
    """Every series name a running server exposes: families from # TYPE lines (labelled metrics with no
    sample yet still declare themselves) with their histogram / counter suffixes, and every sample name."""
    from tests.server_fixtures import gmm_model, pb, running_server, stub_for

    with ExitStack() as stack:
        if QUEUE_BUILT:
            stack.enter_context(_queue_figures_exported())
        srv = stack.enter_context(running_server({"gmm": gmm_model()}, metrics_port=0))
        stub, channel = stub_for(srv)
        stub.Generate(pb.GenerateRequest(model="gmm", sampler="unipc", steps=3, num_samples=2))
        channel.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
                        "counter": ("_total",)}.get(kind, ())
            names.update(name + s for s in suffixes if not name.endswith(s))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return frozenset(names)


# The job queue (issue 7): its metrics are checked live once it is in the build.
QUEUE_BUILT = (ROOT / "server" / "queue_metrics.py").exists()


def _is_queue_metric(name: str) -> bool:
    return name.startswith("diffserve_queue_") and not name.startswith("diffserve_queue_wait_seconds")


# Series that Prometheus makes itself, not the server.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "and", "or", "unless", "rate",
                "increase", "deriv", "histogram_quantile", "absent", "le", "bool", "offset", "group_left",
                "group_right", "humanize", "vector", "min_over_time", "max_over_time", "avg_over_time", "topk",
                "label_values", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {label matchers} and not functions/keywords."""
    expr = re.sub(r"\{[^}]*\}", "", expr)               # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)              # range selectors, $__rate_interval
    expr = re.sub(r'"[^"]*"', "", expr)                 # strings
    expr = re.sub(r"\bby\s*\([^)]*\)|\bwithout\s*\([^)]*\)|\bon\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w.lower() not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e+-]+", w)}


def _check_names(where: str, names: set[str]) -> list[str]:
    exported = _exported_metric_names()
    skip = (lambda n: _is_queue_metric(n)) if not QUEUE_BUILT else (lambda n: False)
    return [f"{where}: {n}" for n in sorted(names - PROMETHEUS_SERIES) if n not in exported and not skip(n)]


def test_metric_name_parser():
    assert _metric_names('histogram_quantile(0.99, sum by (model, le) (rate(diffserve_request_seconds_bucket'
                         '{model=~"$model"}[$__rate_interval])))') == {"diffserve_request_seconds_bucket"}
    assert _metric_names('max(x_lag) > 0 unless on () sum(up{job="w"} == 1) > 0') == {"x_lag", "up"}


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "diffserve.json").read_text())


def _panel_targets(dashboard: dict):
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                yield sub, target


def test_dashboard_queries_name_metrics_the_server_exports():
    dashboard = _dashboard()
    missing, panels = [], 0
    for panel, target in _panel_targets(dashboard):
        names = _metric_names(target["expr"])
        assert names, f"panel {panel['title']!r}: query names no metric: {target['expr']}"
        missing += _check_names(f"panel {panel['title']!r}", names)
        panels += 1
    assert panels >= 15 and not missing, missing
    # The serving metrics this dashboard must show, whatever else changes.
    shown = set().union(*(_metric_names(t["expr"]) for _, t in _panel_targets(dashboard)))
    assert {"diffserve_requests_total", "diffserve_request_seconds_bucket", "diffserve_batch_size_bucket",
            "diffserve_nfe_total", "diffserve_queue_lag", "diffserve_queue_jobs",
            "diffserve_queue_worker_busy_tasks"} <= shown


def test_alert_rules_name_metrics_the_server_exports():
    rules = [r for g in _yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]]
    missing = [m for r in rules for m in _check_names(f"alert {r['alert']}", _metric_names(r["expr"]))]
    assert not missing, missing


def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["uid"] == "diffserve"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel, target in _panel_targets(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}" and target["datasource"]["uid"] == "${datasource}"
        used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval"}
        assert used <= variables, (panel["title"], used)
    refs = [(p["id"], t["refId"]) for p, t in _panel_targets(dashboard)]
    assert len(refs) == len(set(refs))
    # Provisioning points Grafana at the file and the data source uid the panels use.
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "diffserve.yml")["providers"][0]
    datasource = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert datasource["uid"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------------------------------------ compose

def _compose() -> dict:
    return _yaml(DEPLOY / "docker-compose.yml")


def _flag(command: list[str], name: str) -> int:
    return int(command[command.index(name) + 1])


def _parse_cli(args: list[str]):
    """Parse a container's arguments with diffserve's own command line (so a flag that the CLI does not know
    fails here, not in a pod). Returns None for a subcommand this build does not have yet (`worker`, before
    the job queue)."""
    from server.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001
    if args[0] not in commands:
        return None
    if not QUEUE_BUILT:  # `--redis URL` is the job queue's flag: checked once the queue is in the build
        args = [a for i, a in enumerate(args) if not a.startswith("--redis")
                and not (i and args[i - 1] == "--redis")]
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"diffserve does not accept: {shlex.join(args)}")


def test_compose_stack():
    compose = _compose()
    services = compose["services"]
    assert {"redis", "server", "worker", "prometheus", "grafana"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    assert {"redis-data", "prometheus-data", "grafana-data"} <= set(compose["volumes"])
    redis = services["redis"]
    assert "redis-data:/data" in redis["volumes"]
    assert "--appendonly yes" in redis["command"] and "--appendfsync everysec" in redis["command"]
    assert re.match(r"redis:(7|8)", redis["image"]), "consumer-group lag needs Redis 7+"
    ports = {s: [p.split(":")[0] for p in services[s].get("ports", [])] for s in services}
    assert ports["server"] == ["50051", "9464"] and ports["prometheus"] == ["9090"] and ports["grafana"] == ["3000"]
    for name in ("server", "worker"):
        assert services[name]["build"]["context"] == ".." and services[name]["depends_on"]["redis"]
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        if volume.startswith("./"):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    server = _parse_cli(services["server"]["command"])
    assert server.command == "serve" and server.host == "0.0.0.0" and server.metrics_port == 9464
    worker = _parse_cli(services["worker"]["command"])
    # Both read the mounted models config, which binds to 0.0.0.0: a worker takes its /metrics address from it.
    for name, args in (("server", server), ("worker", worker)):
        if args is None:
            continue
        mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services[name]["volumes"])
        source = next(src for src, dst in mounts.items() if dst == args.config)
        assert tomllib.loads((DEPLOY / source).read_text())["server"]["host"] == "0.0.0.0"


# ------------------------------------------------------------------------------------------------ Kubernetes

def _renderer() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return [_tool("kustomize"), "build"]


@cache
def _render(overlay: str) -> tuple[dict, ...]:
    out = _run([*_renderer(), str(K8S / "overlays" / overlay)])
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _strict(schema: dict) -> dict:
    """A CRD schema as jsonschema: object properties not listed are errors (a cluster would prune them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@cache
def _crd_schemas() -> dict:
    schemas = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        crd = _yaml(path)
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _validate(doc: dict) -> None:
    import jsonschema
    import kubernetes_validate

    key = (doc["apiVersion"], doc["kind"])
    if key in _crd_schemas():
        jsonschema.validate(doc, _crd_schemas()[key])
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = _render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "ScaledObject", "PodMonitor",
            "PrometheusRule"} <= kinds
    for doc in docs:
        try:
            _validate(doc)
        except Exception as err:  # noqa: BLE001 - name the object in the failure
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {err}")
        assert doc["metadata"].get("namespace", "diffserve") == "diffserve" or doc["kind"] == "Namespace"
    assert ("StatefulSet" in kinds) == (overlay != "external-redis")


def test_schema_validation_rejects_mistakes():
    """The validators do reject what a cluster would reject (or silently drop): a wrong type, a misspelt field."""
    import jsonschema
    import kubernetes_validate

    deployment = copy.deepcopy(_by_kind(_render("cpu"), "Deployment", "diffserve-server"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_by_kind(_render("cpu"), "Deployment", "diffserve-server"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(_by_kind(_render("cpu"), "ScaledObject", "diffserve-worker"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        _validate(scaled)
    scaled = copy.deepcopy(_by_kind(_render("cpu"), "ScaledObject", "diffserve-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 10
    with pytest.raises(jsonschema.ValidationError):
        _validate(scaled)


def _by_kind(docs, kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(docs, name: str) -> dict:
    return _by_kind(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


# The redis-streams scaler's metadata keys (KEDA docs, scalers/redis-streams): the CRD types `metadata` as a
# string map, so the scaler's own parameters are checked here.
REDIS_STREAMS_KEYS = {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
                      "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount", "streamLength",
                      "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_on_the_queue(overlay):
    docs = _render(overlay)
    scaled = _by_kind(docs, "ScaledObject", "diffserve-worker")["spec"]
    target = _by_kind(docs, "Deployment", scaled["scaleTargetRef"]["name"])
    assert target["metadata"]["name"] == "diffserve-worker" and "replicas" not in target["spec"]
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    env = {e["name"] for e in target["spec"]["template"]["spec"]["containers"][0]["env"]}
    modes = set()
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams" and set(meta) <= REDIS_STREAMS_KEYS, meta
        assert {meta["addressFromEnv"], meta["passwordFromEnv"]} <= env
        assert meta["stream"] and meta["consumerGroup"]
        if "lagCount" in meta:
            assert "activationLagCount" in meta, "KEDA requires activationLagCount with lagCount"
            modes.add("lag")
        if "pendingEntriesCount" in meta:
            modes.add("pending")
        assert all(int(meta[k]) >= 0 for k in ("lagCount", "activationLagCount", "pendingEntriesCount") if k in meta)
        assert meta.get("enableTLS", "false") == ("true" if overlay == "external-redis" else "false")
    assert modes == {"lag", "pending"}
    # Only the lag trigger can wake a deployment from zero; the GPU overlay uses scale-to-zero.
    assert (scaled["minReplicaCount"] == 0) == (overlay == "gpu")
    _check_queue_names(scaled["triggers"])


def _check_queue_names(triggers) -> None:
    """KEDA watches every task stream of the queue, with the workers' consumer group."""
    if not QUEUE_BUILT:
        return
    from server.config import ServerConfig
    from server.queue.keys import GROUP, Keys

    prefix = tomllib.loads((K8S / "base" / "models.toml").read_text()).get("server", {}).get(
        "queue_prefix", ServerConfig().queue_prefix)
    watched = {(t["metadata"]["stream"], "lagCount" in t["metadata"]) for t in triggers}
    assert watched == {(stream, lag) for stream in Keys(prefix).streams for lag in (True, False)}
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {GROUP}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_reference_what_exists(overlay):
    """Every ConfigMap / Secret a pod names is rendered (generators add hash suffixes), every Service selects pods."""
    docs = _render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for workload in pods:
        spec = workload["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret = _by_kind(docs, "Secret", ref["secretKeyRef"]["name"])
                    assert ref["secretKeyRef"]["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
                if "configMapKeyRef" in ref:
                    config = _by_kind(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
                    assert ref["configMapKeyRef"]["key"] in config["data"]
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= w["spec"]["template"]["metadata"]["labels"].items() for w in pods), service
    monitor = _by_kind(docs, "PodMonitor", "diffserve")
    selected = [w for w in pods if monitor["spec"]["selector"]["matchLabels"].items()
                <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert {w["metadata"]["name"] for w in selected} == {"diffserve-server", "diffserve-worker"}
    for workload in selected:
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert "metrics" in {p["name"] for p in container["ports"]}
        assert workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] in JOBS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_probes_and_commands(overlay):
    docs = _render(overlay)
    server = _container(docs, "diffserve-server")
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    assert server["readinessProbe"]["grpc"] == {"port": grpc_port, "service": HEALTH_SERVICE}
    assert server["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert server["startupProbe"]["grpc"]["port"] == grpc_port
    args = _parse_cli(server["args"])
    assert args.command == "serve" and args.port == grpc_port and args.host == "0.0.0.0"
    assert args.token_env in {e["name"] for e in server["env"]}
    worker = _container(docs, "diffserve-worker")
    _parse_cli(worker["args"])
    gpu = overlay == "gpu"
    for container in (server, worker):
        limits = container["resources"].get("limits", {})
        assert (limits.get("nvidia.com/gpu") == "1") == gpu
        assert container["image"] == f"diffserve:{'cuda' if gpu else 'cpu'}"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("diffserve-models"))
    settings = tomllib.loads(config["data"]["models.toml"])["server"]
    assert settings["device"] == ("cuda" if gpu else "cpu")
    # Workers take their /metrics address from the config: the kubelet probe and Prometheus need the pod IP.
    assert settings["host"] == "0.0.0.0"
    # Each pod's own drain (grace_seconds, plus the worker's hand-back) fits in its termination grace period.
    for name in ("diffserve-server", "diffserve-worker"):
        pod = _by_kind(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= settings["grace_seconds"] + 10


def test_models_configs_match_the_zoo(tmp_path):
    from models.config import load_config
    from server.config import load_server_config

    base = tomllib.loads((K8S / "base" / "models.toml").read_text())
    gpu = tomllib.loads((K8S / "overlays" / "gpu" / "models.toml").read_text())
    assert base["models"] == gpu["models"] and base["model_roots"] == gpu["model_roots"] == ["/app/zoo"]
    assert {**base["server"], "device": "cuda"} == gpu["server"]
    for path in (K8S / "base" / "models.toml", K8S / "overlays" / "gpu" / "models.toml"):
        load_server_config(path)  # unknown [server] keys are errors
    zoo = ROOT / "zoo" / "models.toml"
    if not zoo.exists():
        pytest.skip("zoo/models.toml is not in this checkout yet")
    zoo_config = tomllib.loads(zoo.read_text())
    assert base["models"] == zoo_config["models"], "deploy/k8s/base/models.toml must list the zoo's models"
    if not all((zoo.parent / m["directory"]).is_dir() for m in zoo_config["models"]):
        pytest.skip("the zoo's model directories are not in this checkout yet")
    # Resolve the pod's config against this checkout's zoo, as the image's /app/zoo.
    local = (K8S / "base" / "models.toml").read_text().replace('"/app/zoo"', json.dumps(str(ROOT / "zoo")))
    (tmp_path / "models.toml").write_text(local)
    assert load_config(tmp_path / "models.toml") == load_config(zoo)


# ------------------------------------------------------------------------------------------------ Dockerfile

def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest))
    return stages


def test_hadolint_passes_and_catches_a_bad_dockerfile(tmp_path):
    hadolint = _tool("hadolint")
    out = _run([hadolint, "--no-color", "Dockerfile"])
    assert out.returncode == 0, out.stdout + out.stderr
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN cd /app && pip install torch\n")
    out = _run([hadolint, "--no-color", str(tmp_path / "Dockerfile")])
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3003" in out.stdout


def test_dockerfile_shape():
    stages = _dockerfile_stages()
    assert len(stages) == 2, "builder + runtime"
    builder, final = stages
    run_builder = " ".join(a for i, a in builder if i == "RUN")
    assert "python -m server.protogen" in run_builder
    final_run = " ".join(a for i, a in final if i == "RUN")
    assert not re.search(r"apt-get|apk |\bmake\b|gcc|build-essential|pip install", final_run), \
        "no toolchain or installs in the final stage"
    user = [a for i, a in final if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    healthcheck = next(a for i, a in final if i == "HEALTHCHECK")
    assert "deploy/grpc_health_check.py" in healthcheck
    entrypoint = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    assert entrypoint == ["diffserve"]
    args = _parse_cli(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.config == "zoo/models.toml"
    copies = [a for i, a in final if i == "COPY"]
    assert any("--from=builder /opt/venv" in c for c in copies) and any("--from=builder /app" in c for c in copies)
    args_decl = " ".join(a for i, a in builder if i == "ARG")
    assert "VARIANT=cpu" in args_decl
    assert "onnxruntime-gpu==" in run_builder and "tensorrt==" in run_builder and '"${VARIANT}" = cuda' in run_builder


def _make_recipe(target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n?)*)", text, re.M)
    assert match, f"Makefile has no {target} target"
    return match.group(1).split(), [line.strip() for line in match.group(2).splitlines()]


def test_dockerfile_installs_what_ci_installs():
    """The image and CI install through one command: `make setup` (pip install -r requirements.txt)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run runs `make test`"
    test_prereqs, _ = _make_recipe("test")
    assert "setup" in test_prereqs
    setup_prereqs, _ = _make_recipe("setup")
    assert setup_prereqs == ["$(STAMP)"], setup_prereqs  # setup = the install, redone when requirements change
    stamp_prereqs, install = _make_recipe("$(STAMP)")
    assert {"requirements.txt", "pyproject.toml"} <= set(stamp_prereqs), stamp_prereqs
    assert install == ["$(BIN)/pip install -q -r requirements.txt", "touch $(STAMP)"], install
    builder = _dockerfile_stages()[0]
    installs = [a for i, a in builder if i == "RUN" and re.search(r"pip install|make setup", a)]
    setup_calls = [m for a in installs for m in [re.search(r"make setup((?: \w+=\S+)*)", a)] if m]
    assert len(setup_calls) == 1
    overrides = dict(kv.split("=", 1) for kv in setup_calls[0].group(1).split())
    assert set(overrides) <= {"VENV", "PY"}, "the image may move the venv, not change what goes in"
    # Other pip installs in the builder: only the CUDA variant's GPU backends, which are pyproject's `gpu` extra
    # at versions that extra admits.
    others = [a for a in installs if "make setup" not in a]
    assert len(others) == 1 and '"${VARIANT}" = cuda' in others[0], others
    _check_gpu_pins(others[0], builder)
    # What the image strips after `make setup` is CI tooling from the dev extra, never a runtime dependency.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in project["optional-dependencies"]["dev"]}
    runtime = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in project["dependencies"]}
    for line in (a for i, a in builder if i == "RUN" and "pip uninstall" in a and "cuda" not in a):
        removed = set(line.split("pip uninstall", 1)[1].split()) - {"-y", "-q"}
        assert removed <= dev and not removed & runtime, removed


def _check_gpu_pins(run: str, builder) -> None:
    from packaging.requirements import Requirement

    defaults = dict(a.split("=", 1) for i, a in builder if i == "ARG" and "=" in a)
    pins = {}
    for name, var in re.findall(r'"([a-z0-9-]+)==\$\{(\w+)\}"', run):
        pins[name] = defaults[var]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if "gpu" not in extras:
        return  # the backends' GPU extra is not in this build yet
    wanted = {Requirement(r).name: Requirement(r).specifier for r in extras["gpu"]}
    assert set(pins) == set(wanted), (pins, wanted)
    for name, version in pins.items():
        assert version in wanted[name], f"{name}=={version} is outside pyproject's gpu extra {wanted[name]}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (last matching pattern wins, `!` re-includes; a pattern also covers
    everything under a matched directory), for the pattern forms used in our .dockerignore."""
    def matches(pattern: str) -> bool:
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.fullmatch(f"{regex}(/.*)?", path) is not None
    ignored = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if matches(pattern[1:]):
                ignored = False
        elif matches(pattern):
            ignored = True
    return ignored


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "requirements.txt", "Makefile", "README.md", "protos/diffserve/v1/diffserve.proto",
              "server/cli.py", "samplers/__init__.py", "models/config.py", "search/__init__.py", "bench/__init__.py",
              "deploy/grpc_health_check.py"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "zoo").rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".json", ".toml")]
    assert not [p for p in needed if _dockerignored(p, patterns)]
    for left_out in (".git/config", ".venv/bin/python", "tests/test_deploy.py", "server/_generated/__init__.py",
                     "deploy/k8s/base/secrets.env", "bench/results/samplers.json", "server/__pycache__/cli.pyc"):
        assert _dockerignored(left_out, patterns), left_out


# ------------------------------------------------------------------------------------------------ health check

def test_container_health_check_script_against_a_live_server():
    from tests.server_fixtures import gmm_model, running_server

    script = [sys.executable, str(DEPLOY / "grpc_health_check.py")]
    with running_server({"gmm": gmm_model()}) as srv:
        for service in ("", HEALTH_SERVICE):
            out = _run([*script, "--port", str(srv.port), "--service", service])
            assert out.returncode == 0, out.stderr
        out = _run([*script, "--port", str(srv.port), "--service", "no.such.Service"])
        assert out.returncode == 1
        srv.set_serving(False)  # what the server reports while it drains
        assert _run([*script, "--port", str(srv.port)]).returncode == 1
        port = srv.port
    assert _run([*script, "--port", str(port), "--timeout", "1"]).returncode == 1


# ------------------------------------------------------------------------------------------------ docs

def test_deploy_docs_are_linked_and_cover_the_topics():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/deploy.md)" in readme
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for topic in ("docker compose", "kubectl apply -k", "appendfsync everysec", "appendfsync always", "KEDA",
                  "scale-to-zero", "change-me"):
        assert topic in docs, topic


def sync_rules() -> None:
    head = ("# The alert rules of deploy/prometheus/alerts.yml for the Prometheus Operator. Keep the two identical:\n"
            "# tests/test_deploy.py fails when they differ (`python tests/test_deploy.py sync-rules` rewrites this).\n"
            "# Your Prometheus must select this rule by its labels (ruleSelector): add the label your\n"
            "# kube-prometheus-stack release uses.\n")

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                 style="|" if "\n" in s else None))
    path = K8S / "components" / "monitoring" / "prometheus-rule.yaml"
    path.write_text(head + yaml.dump(_rule_from_alerts(), Dumper=Dumper, sort_keys=False, width=120))


if __name__ == "__main__":
    if sys.argv[1:] == ["sync-rules"]:
        sync_rules()
    else:
        sys.exit(__doc__)
