"""deploy/: every manifest parses and keeps the promises the runbook makes about it.

These read the files (they always run); tests/unit/test_deploy_tools.py runs the real tools
on them (Docker Compose v2, promtool and amtool, nginx, KEDA's CRD schemas) and
test_image_context.py computes the image's build context. Kubernetes manifests are
validated against the API's JSON schemas with `kubernetes-validate` (dev extra), and every
metric name a dashboard or alert uses is checked against rev_tasks.metrics.METRIC_NAMES and
rev_tasks.ops.gpu.GPU_METRIC_NAMES.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rev_tasks import queues
from rev_tasks.metrics import METRIC_NAMES
from rev_tasks.ops import memory
from rev_tasks.ops.gpu import GPU_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rev-farm.json"
DECLARED_QUEUES = {*queues.BASE_QUEUES, queues.ENDPOINT}
WORKER_SERVICES = ("worker-cpu", "worker-consensus", "worker-maintenance", "worker-endpoint")
#: Workers that call tenants' endpoints (endpoint jobs, their validators' re-queries): the
#: only ones on the outbound network besides the backend.
EGRESS_WORKERS = ("worker-endpoint", "worker-consensus")
#: Series Prometheus itself provides.
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            yield path, doc


def _workloads() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path, doc in _k8s_docs():
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield path, doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def _default(value: object) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def _bytes(quantity: str) -> float:
    """``4G`` (compose) or ``4Gi`` (Kubernetes) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?[Bb]?", quantity.strip())
    assert m, quantity
    return float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_")


def _check_memory_budget(where: str, argv: list[str], max_kb: str, limit: str) -> None:
    """Celery replaces a child above worker_max_memory_per_child only after its task; all
    children at that ceiling must still fit the container, or the OOM killer acts first."""
    children = int(argv[argv.index("-c") + 1])
    need = children * int(max_kb) * 1024
    assert need < 0.9 * _bytes(limit), f"{where}: {children} x {max_kb} KB vs limit {limit}"


def _task_time_limit(job_time_limit: str) -> int:
    """celeryconfig's hard task limit for a REV_JOB_TIME_LIMIT, read from the real module."""
    env = dict(os.environ, REV_JOB_TIME_LIMIT=job_time_limit)
    code = "import celeryconfig; print(celeryconfig.task_time_limit)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


# --------------------------------------------------------------------------- all files
@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert _docs(path), f"{path} is empty"


def test_dashboard_json_parses() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "rev-farm" and dash["panels"]


def test_env_example_covers_compose_variables() -> None:
    """Every variable compose needs without a default is documented in .env.example."""
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M)
    )
    text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    used = re.findall(r"\$\{([A-Z][A-Z0-9_]*)(:?[-?][^}]*)?\}", text)
    required = {name for name, default in used if not default or default.startswith((":?", "?"))}
    assert required <= documented, required - documented
    assert {name for name, _ in used} <= documented | {"REV_GPU_IMAGE", "TORCH_CUDA_INDEX_URL"}


def test_env_k8s_example_holds_the_secrets_keys() -> None:
    """`kubectl create secret --from-env-file=.env.k8s` (deploy/k8s/README.md) makes the
    rev-secrets Secret: the example has its keys but the key file's, unquoted (kubectl
    takes the rest of the line literally)."""
    secrets = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "Secret"}
    assert set(secrets) == {"rev-secrets", "rev-certificate-key"}
    secret = secrets["rev-secrets"]
    lines = (ROOT / ".env.k8s.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    assert set(env) == set(secret["stringData"]) - {"rev.key", "session.key", "credential.key"}
    assert not [v for v in env.values() if v[:1] in {"'", '"'}]
    used = set()
    for _, doc in _k8s_docs():
        for ref in doc.get("spec", {}).get("secretTargetRef", []):
            used.add(ref["key"])
    assert used and used <= set(env) | {"rev.key"}


# --------------------------------------------------------------------------- compose
def test_compose_services_and_networks() -> None:
    c = _compose()
    services = c["services"]
    expected = {
        "proxy", "coordinator", "worker-cpu", "worker-consensus", "worker-maintenance", "beat",
        "flower", "migrate", "redis", "postgres", "prometheus", "alertmanager", "grafana",
        "worker-endpoint",
    }  # fmt: skip
    assert expected <= set(services)
    assert c["networks"]["backend"]["internal"] is True
    for name in ("redis", "postgres", "beat", "migrate", *WORKER_SERVICES):
        if name in EGRESS_WORKERS:
            assert services[name]["networks"] == ["backend", "egress"], name
            continue
        assert services[name]["networks"] == ["backend"], f"{name} must be backend-only"
    assert "internal" not in c["networks"]["egress"] and not c["networks"]["egress"].get("ports")
    # only the TLS proxy is public; Prometheus only on the host's loopback
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert set(published) == {"proxy", "prometheus"}
    assert all(str(p).startswith("127.0.0.1:") for p in published["prometheus"])
    assert any(str(p).endswith(":443") for p in published["proxy"])
    declared = set(c.get("volumes", {})) | set(c.get("secrets", {}))
    for name, svc in services.items():
        for net in svc.get("networks", []):
            assert net in c["networks"], f"{name}: undeclared network {net}"
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} missing"
            else:
                assert src in declared, f"{name}: undeclared volume {src}"
        for secret in svc.get("secrets", []):
            assert secret in c["secrets"]


def test_compose_healthchecks_and_order() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        if name == "migrate":
            assert svc["restart"] == "no" and svc["command"] == ["alembic", "upgrade", "head"]
            continue
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
    for name in ("coordinator", "beat", *WORKER_SERVICES):
        dep = services[name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_processes() -> None:
    services = _compose()["services"]
    assert services["coordinator"]["command"][0] == "gunicorn"
    assert "web:create_app()" in services["coordinator"]["command"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd
    beat = services["beat"]
    assert beat["deploy"]["replicas"] == 1 and beat["container_name"]  # --scale beat=2 fails
    assert "container_name" not in services["worker-cpu"]  # scalable with --scale
    flower = services["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "${FLOWER_BASIC_AUTH:?" in COMPOSE.read_text()
    assert "FLOWER_UNAUTHENTICATED_API" not in COMPOSE.read_text()
    consumed: set[str] = set()
    for name in WORKER_SERVICES:
        cmd = services[name]["command"]
        assert cmd[:4] == ["celery", "-A", "rev_tasks", "worker"], name
        consumed |= set(cmd[cmd.index("-Q") + 1].split(","))
        assert "PROMETHEUS_MULTIPROC_DIR" in services[name]["environment"]
    assert consumed == DECLARED_QUEUES
    assert "-O" in services["worker-cpu"]["command"]
    limit = _task_time_limit(str(os.environ.get("REV_JOB_TIME_LIMIT_DEFAULT", "3600")))
    for name in WORKER_SERVICES:
        grace = _seconds(services[name]["stop_grace_period"])
        assert grace > limit, f"{name}: stop_grace_period {grace}s <= task_time_limit {limit}s"


def test_the_credential_key_reaches_exactly_who_encrypts_or_reveals() -> None:
    """The coordinator encrypts stored credentials; endpoint workers and the validators that
    re-query an endpoint decrypt them: each of them, and no other service, mounts the key."""
    services = _compose()["services"]
    holders = {n for n, svc in services.items() if "rev_credential_key" in svc.get("secrets", [])}
    assert holders == {"coordinator", "worker-endpoint", "worker-consensus"}
    for name in holders:
        env = services[name]["environment"]
        assert env["REV_CREDENTIAL_KEY_FILE"] == "/run/secrets/rev_credential_key", name
    assert "rev_credential_key" in _compose()["secrets"]


def test_only_the_consensus_workers_hold_the_certificate_key() -> None:
    """The signing key reaches the pods that sign (the tally) and no other; every coordinator
    replica reads the one session key, so a browser stays logged in across replicas."""
    services = _compose()["services"]
    holders = {name for name, svc in services.items() if "rev_cert_key" in svc.get("secrets", [])}
    assert holders == {"worker-consensus"}
    consensus, coordinator = services["worker-consensus"], services["coordinator"]
    assert consensus["environment"]["REV_CERT_KEY_FILE"] == "/run/secrets/rev_cert_key"
    assert "rev_session_key" in coordinator["secrets"]
    assert coordinator["environment"]["REV_SESSION_KEY_FILE"] == "/run/secrets/rev_session_key"

    mounted: dict[str, dict[str, str]] = {}  # workload -> {file path: secret name}
    for _, doc in _workloads():
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
        files = mounted.setdefault(doc["metadata"]["name"], {})
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                secret = volumes.get(mount["name"])
                for item in (secret or {}).get("items", []):
                    files[f"{mount['mountPath']}/{item['path']}"] = secret["secretName"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for variable in (
                "REV_CERT_KEY_FILE",
                "REV_SESSION_KEY_FILE",
                "REV_CREDENTIAL_KEY_FILE",
            ):
                if variable in env:
                    assert env[variable] in files, f"{doc['metadata']['name']}: {variable}"
    holders = {w for w, files in mounted.items() if "rev-certificate-key" in files.values()}
    assert holders == {"rev-worker-consensus"}
    assert "/run/secrets/rev/session.key" in mounted["rev-coordinator"]
    credential = {w for w, files in mounted.items() if "/run/secrets/rev/credential.key" in files}
    assert credential == {"rev-coordinator", "rev-worker-endpoint", "rev-worker-consensus"}


def test_compose_worker_memory_fits_the_limit() -> None:
    services = {**_compose()["services"], **yaml.safe_load(COMPOSE_GPU.read_text())["services"]}
    checked = 0
    for name, svc in services.items():
        if name.startswith("worker-"):
            argv = [_default(a) for a in svc["command"]]
            max_kb = _default(svc["environment"]["REV_WORKER_MAX_MEMORY_KB"])
            _check_memory_budget(name, argv, max_kb, svc["deploy"]["resources"]["limits"]["memory"])
            checked += 1
    assert checked == 6


def _runs_models(argv: list[str]) -> bool:
    """A worker consuming an inference or the consensus queue loads models."""
    consumed = argv[argv.index("-Q") + 1].split(",")
    return any(q.startswith("inference.") or q == queues.CONSENSUS for q in consumed)


def test_the_workers_that_run_models_start_on_jemalloc() -> None:
    """What `rev worker` preloads (rev_tasks/ops/memory.py), in the image and the manifests."""
    assert re.search(r"apt-get install[^\n]*\blibjemalloc2\b", (DEPLOY / "Dockerfile").read_text())
    services = {**_compose()["services"], **yaml.safe_load(COMPOSE_GPU.read_text())["services"]}
    seen = []
    for name, svc in services.items():
        if name.startswith("worker-") and _runs_models([_default(a) for a in svc["command"]]):
            assert svc["environment"].get("LD_PRELOAD") == memory.JEMALLOC, name
            seen.append(name)
    assert sorted(seen) == ["worker-consensus", "worker-cpu", "worker-gpu0", "worker-gpu1"]
    pods = []
    for path, doc in _workloads():
        for c in _containers(doc):
            if "worker" in c.get("args", []) and _runs_models(c["args"]):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("LD_PRELOAD") == memory.JEMALLOC, path.name
                pods.append(path.name)
    assert sorted(pods) == ["worker-consensus.yaml", "worker-cpu.yaml", "worker-gpu.yaml"]


def test_compose_gpu_override_pins_one_worker_per_gpu() -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert gpu
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and len(devices[0]["device_ids"]) == 1, name
        index = devices[0]["device_ids"][0]
        cmd = svc["command"]
        assert cmd[cmd.index("-Q") + 1] == queues.gpu_queue(int(index)), name
        assert cmd[cmd.index("-c") + 1] == "1", name
        assert svc["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
        assert svc["environment"]["REV_WORKER_DEVICE"] == "cuda"


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert 'torch==${TORCH_VERSION}"' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    entry = DEPLOY / "entrypoint.sh"
    assert entry.exists() and os.access(entry, os.X_OK)
    assert "entrypoint.sh" in text and "tini" in text
    assert (ROOT / ".dockerignore").exists()  # what it keeps out: test_image_context.py


def test_nginx_terminates_tls_and_hides_metrics() -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"listen 443 ssl;", conf)
    # relative to nginx.conf: /etc/nginx/certs in the container, where compose mounts them
    assert "ssl_certificate     certs/tls.crt;" in conf
    assert "./nginx/certs:/etc/nginx/certs:ro" in _compose()["services"]["proxy"]["volumes"]
    assert "return 301 https://" in conf
    assert "location = /flower/metrics { return 404; }" in conf
    assert "location = /metrics { return 404; }" in conf
    for upstream in ("coordinator:8000", "flower:5555", "grafana:3000"):
        assert upstream in conf


# --------------------------------------------------------------------------- kubernetes
def test_k8s_documents_are_named_and_namespaced() -> None:
    kinds = set()
    for path, doc in _k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"
        if doc["kind"] not in {"Namespace", "Kustomization"}:
            assert doc["metadata"].get("namespace") == "rev", f"{path}: {doc['kind']}"
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ScaledObject"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Job", "Ingress"} <= kinds


def test_k8s_containers_have_requests_and_limits() -> None:
    for path, doc in _workloads():
        for c in _containers(doc):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{path}: {c['name']} {part}"


def test_k8s_selectors_match_their_pods() -> None:
    pod_labels = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for _, doc in _workloads()
    }
    for path, doc in _k8s_docs():
        if doc["kind"] == "Deployment":
            sel = doc["spec"]["selector"]["matchLabels"]
            assert sel.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), path
        if doc["kind"] in {"Service", "PodDisruptionBudget"}:
            spec = doc["spec"]["selector"]
            sel = spec.get("matchLabels", spec)
            assert any(sel.items() <= labels.items() for labels in pod_labels.values()), (
                f"{path}: {doc['kind']} {doc['metadata']['name']} selects no pod"
            )


def test_k8s_scaling_and_workers() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_docs()}
    deployments = {name: d for (kind, name), d in docs.items() if kind == "Deployment"}
    assert {
        "rev-coordinator", "rev-worker-cpu", "rev-worker-gpu", "rev-worker-consensus",
        "rev-beat", "rev-flower", "rev-worker-endpoint",
    } <= set(deployments)  # fmt: skip

    beat = deployments["rev-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"

    scaled = docs[("ScaledObject", "rev-worker-cpu")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "rev-worker-cpu"
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queues.INFERENCE_CPU
    # Endpoint workers: a threads pool on their own queue, scaled on its list length.
    endpoint = docs[("ScaledObject", "rev-worker-endpoint")]["spec"]
    assert endpoint["scaleTargetRef"]["name"] == "rev-worker-endpoint"
    assert endpoint["triggers"][0]["type"] == "redis"
    assert endpoint["triggers"][0]["metadata"]["listName"] == queues.ENDPOINT
    endpoint_args = deployments["rev-worker-endpoint"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert endpoint_args[endpoint_args.index("-Q") + 1] == queues.ENDPOINT
    assert endpoint_args[endpoint_args.index("-P") + 1] == "threads"
    hpas = [d for (kind, _), d in docs.items() if kind == "HorizontalPodAutoscaler"]
    assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == ["rev-coordinator"]

    gpu = deployments["rev-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1

    config = docs[("ConfigMap", "rev-config")]["data"]
    limit = _task_time_limit(config["REV_JOB_TIME_LIMIT"])
    consumed: set[str] = set()
    for name, d in deployments.items():
        if not name.startswith("rev-worker-"):
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > limit, name
        args = spec["containers"][0]["args"]
        consumed |= set(args[args.index("-Q") + 1].split(","))
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == config["REV_METRICS_PORT"], name
        container = spec["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        memory = container["resources"]["limits"]["memory"]
        _check_memory_budget(name, args, env["REV_WORKER_MAX_MEMORY_KB"], memory)
    assert consumed >= DECLARED_QUEUES

    pdb_targets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for (kind, _), d in docs.items()
        if kind == "PodDisruptionBudget"
    }
    assert {"coordinator", "worker-cpu", "worker-consensus", "worker-endpoint"} <= pdb_targets
    assert "beat" not in pdb_targets  # a PDB on a single pod blocks node drains


def test_k8s_kustomization_lists_the_manifests() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).exists(), name
    on_purpose = {
        "kustomization.yaml",
        "secret.example.yaml",
        "migrate-job.yaml",
        "worker-gpu.yaml",
    }
    assert {p.name for p in K8S.glob("*.yaml")} - on_purpose == listed


def test_k8s_manifests_match_the_api_schemas() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (dev extra)"
    )
    checked = 0
    for path, doc in _k8s_docs():
        if doc["kind"] == "Kustomization" or doc["apiVersion"].startswith("keda.sh/"):
            continue  # not Kubernetes API types: KEDA's are checked in test_deploy_tools.py
        try:
            kv.validate(doc, "1.30.0", strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")
        checked += 1
    assert checked >= 15


# --------------------------------------------------------------------------- prometheus
_PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric identifiers in a PromQL expression (no functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors and subqueries ($__rate_interval)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if m.group(2) or m.group(1) in _PROMQL_KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_promql_parser_itself() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, device) (rate(model_inference_duration_seconds_bucket"
        '{job=~"rev-worker.*", device!="x"}[5m]))) > 0.2 and on(instance) up == 1 '
        "or time() - max(rev_backup_last_success_timestamp_seconds) > 26 * 3600 "
        "unless sum(rate(foo:bar_total[$__rate_interval])) without (pid) > 1e3"
    )
    assert promql_metric_names(expr) == {
        "model_inference_duration_seconds_bucket",
        "up",
        "rev_backup_last_success_timestamp_seconds",
        "foo:bar_total",
    }


def test_alert_and_dashboard_metrics_exist() -> None:
    used: dict[str, set[str]] = {}
    for rule in _alert_rules():
        for name in promql_metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in _dashboard_exprs():
        for name in promql_metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    known = METRIC_NAMES | GPU_METRIC_NAMES | BUILTIN_SERIES
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"not in METRIC_NAMES or GPU_METRIC_NAMES: {unknown}"
    assert len(used) >= 12  # the check looked at something


def test_alerts_keep_the_guides_promises() -> None:
    rules = {r["alert"]: r for r in _alert_rules()}
    p99 = rules["InferenceLatencyP99High"]["expr"]
    assert "histogram_quantile(0.99" in p99 and "> 0.2" in p99
    assert "< 0.99" in rules["ConsensusSuccessRateLow"]["expr"]
    assert "up{" in rules["WorkerDown"]["expr"] and "== 0" in rules["WorkerDown"]["expr"]
    assert "queue_depth" in rules["QueueBacklog"]["expr"]
    assert "26 * 3600" in rules["BackupTooOld"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    # every job an alert names is one Prometheus scrapes
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    for rule in rules.values():
        for pattern in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert any(re.fullmatch(pattern, j) for j in jobs), (rule["alert"], pattern)


def test_dashboard_panels_and_datasource() -> None:
    exprs = " ".join(_dashboard_exprs())
    for needle in (
        "rev_jobs_finished_total",
        "histogram_quantile(0.5, sum by (le) (rate(model_inference_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(model_inference_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(model_inference_duration_seconds_bucket",
        "consensus_duration_seconds_bucket",
        "queue_depth",
        "worker_memory_bytes",
        "models_cached",
        "rev_backup_last_success_timestamp_seconds",
        "rev_endpoint_request_duration_seconds_bucket",
        "rev_endpoint_errors_total",
        "rev_endpoint_tokens_total",
        "rev_endpoint_retries_total",
    ):
        assert needle in exprs, needle
    assert "by (verdict)" in exprs
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = ds["datasources"][0]["uid"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "rev-farm.yml").read_text()
    )
    mount = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{mount}:ro" in _compose()["services"]["grafana"]["volumes"]


def test_prometheus_scrapes_every_component() -> None:
    scrape = yaml.safe_load(PROMETHEUS.read_text())
    targets = json.dumps(scrape["scrape_configs"])
    for name in ("coordinator", *WORKER_SERVICES, "flower:5555"):
        assert name in targets, name
    # relative to prometheus.yml, so the same in the container (/etc/prometheus) and here
    assert scrape["rule_files"] == ["alerts.yml"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
