"""The report pages in a real headless browser, on real farm jobs; certificates end to end.

A real worker runs a SAME, a DIFFERENT, an identify and a failing job for tenant ``alpha``
(and one for ``beta``); the coordinator is served on loopback by werkzeug's server in a
thread, backed by the session's PostgreSQL and Redis; Debian's chromium, driven through
its own chromedriver by Selenium, logs in with alpha's key and reads every report. The
worker signs each published verdict with the farm's certificate key (in the tally, for
verify and identify jobs alike); ``rev certificate verify`` checks them.

Screenshots go to ``$REV_TEST_ARTIFACTS`` (default ``var/test-artifacts/browser``); their
paths are printed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.integration.farm import ROOT, register, submit, wait_certificate, wait_job

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
ARTIFACTS = Path(
    os.environ.get("REV_TEST_ARTIFACTS") or ROOT / "var" / "test-artifacts" / "browser"
)


# ----------------------------------------------------------------------------- the farm
@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker(name="reports")


@pytest.fixture(scope="module")
def signing_key(farm_env: dict[str, str]) -> Any:
    """The key the farm's workers sign with (REV_CERT_KEY_FILE)."""
    from rev_tasks import certificates as C

    return C.load_signing_key(farm_env["REV_CERT_KEY_FILE"])


@pytest.fixture(scope="module")
def jobs(
    client_for: Any,
    keys: dict[str, str],
    worker: Any,
    model_dirs: dict[str, Path],
) -> dict[str, dict[str, Any]]:
    """Real farm runs: alpha's SAME, DIFFERENT, identify and failed jobs, and beta's job."""
    alpha, beta = client_for(keys["alpha"]), client_for(keys["beta"])
    for model_id, name in (("report-gpt2-a", "gpt2-a"), ("report-gpt2-b", "gpt2-b")):
        assert register(alpha, model_id, model_dirs[name])["status"] == "ready"
    path = {name: {"path": str(model_dirs[name])} for name in model_dirs}
    bodies = {
        "same": {"kind": "verify", "reference": path["gpt2-a"], "candidate": path["gpt2-a-copy"]},
        "different": {"kind": "verify", "reference": "report-gpt2-a", "candidate": path["gpt2-b"]},
        "identify": {"kind": "identify", "candidate": path["gpt2-a-copy"]},
        "failed": {"kind": "verify", "reference": "report-gpt2-a", "candidate": path["corrupt"]},
    }
    ids = {name: submit(alpha, {**body, "device": "cpu"}) for name, body in bodies.items()}
    ids["beta"] = submit(beta, {**bodies["same"], "device": "cpu"})
    docs = {name: wait_job(alpha if name != "beta" else beta, jid) for name, jid in ids.items()}
    assert [docs[n]["status"] for n in ("same", "different", "identify", "failed")] == [
        "succeeded", "succeeded", "succeeded", "failed",
    ], {n: d["error"] for n, d in docs.items()}  # fmt: skip
    assert docs["same"]["result"]["verdict"] == "SAME"
    assert docs["different"]["result"]["verdict"] == "DIFFERENT"
    assert docs["identify"]["result"]["best"] == "report-gpt2-a"
    assert docs["failed"]["error"]["code"] == "model_load_error"
    # The tally signs in the transaction that publishes, for identify jobs too.
    for name in ("same", "different", "beta"):
        owner = alpha if name != "beta" else beta
        assert owner.get(f"/v1/jobs/{ids[name]}/certificate").status_code == 200, name
    wait_certificate(alpha, ids["identify"])
    return docs


@pytest.fixture(scope="module")
def server(app: Any, jobs: Any) -> Iterator[str]:
    """The coordinator on a loopback port (werkzeug's threaded server in a thread)."""
    from werkzeug.serving import make_server

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="coordinator", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


# ----------------------------------------------------------------------------- the browser
class Browser:
    """Selenium on Debian's chromium: every request URL and console message is recorded."""

    def __init__(self, base: str, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.base = base
        self.requests: list[str] = []
        self.statuses: dict[str, int] = {}

    def get(self, path: str) -> None:
        self.driver.get(self.base + path)

    def drain(self) -> list[dict[str, Any]]:
        """Console messages since the last call; network events into requests/statuses."""
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            params = msg.get("params", {})
            if msg["method"] == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif msg["method"] == "Network.responseReceived":
                self.statuses[params["response"]["url"]] = params["response"]["status"]
        return [e for e in self.driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def click(self, element: Any) -> None:
        """Click something that navigates, and wait until the next page has loaded."""
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.css("html")[0]
        element.click()
        WebDriverWait(self.driver, 15).until(EC.staleness_of(old))
        WebDriverWait(self.driver, 15).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )

    def text(self, selector: str) -> str:
        return " ".join(e.text for e in self.css(selector))

    def screenshot(self, name: str) -> Path:
        """The whole page, not just the viewport."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(server: str, tmp_path_factory: Any) -> Iterator[Browser]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        from tests.conftest import service_unavailable

        service_unavailable("chromium/chromedriver missing: run scripts/install_tools.sh")
    b = Browser(server, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.quit()


def _no_console_errors(b: Browser, page: str) -> None:
    messages = b.drain()
    assert not messages, f"{page}: console messages {messages}"


def test_browser_reports(browser: Browser, jobs: dict[str, dict[str, Any]], keys: Any) -> None:
    b = browser
    same, diff = jobs["same"], jobs["different"]

    # Logged out: the report redirects to the login form, which returns there afterwards.
    b.get(f"/ui/jobs/{same['id']}")
    assert urlsplit(b.driver.current_url).path == "/ui/login"
    assert "next=" in b.driver.current_url
    b.screenshot("01-login")
    _no_console_errors(b, "login")
    b.css("#api_key")[0].send_keys(keys["alpha"])
    b.click(b.css("form button[type=submit]")[0])
    assert urlsplit(b.driver.current_url).path == f"/ui/jobs/{same['id']}"
    cookie = b.driver.get_cookie("rev_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/ui"

    for name, doc in (("same", same), ("different", diff)):
        if name != "same":
            b.get(f"/ui/jobs/{doc['id']}")
        verdict = doc["result"]["verdict"]
        assert b.text(".banner .big") == verdict
        used = doc["result"]["challenges_used"]
        assert len(b.css("svg.sprt .point")) == used >= 1
        assert len(b.css("svg.distances .point")) == used
        upper = b.css("svg.sprt g.threshold-upper")
        lower = b.css("svg.sprt g.threshold-lower")
        assert len(upper) == len(lower) == 1
        assert float(upper[0].get_attribute("data-value")) == pytest.approx(4.60517, rel=1e-4)
        assert float(lower[0].get_attribute("data-value")) == pytest.approx(-4.60517, rel=1e-4)
        assert len(b.css(".votes tbody tr")) == 5
        assert doc["result"]["transcript_root"] in b.text(".hash")
        assert "rev audit" in b.text("pre.cmd") and "rev certificate verify" in b.text("pre.cmd")
        assert "gpt2" in b.text(".models")
        b.screenshot(f"02-report-{name}")
        _no_console_errors(b, name)

    b.get(f"/ui/jobs/{jobs['identify']['id']}")
    assert "report-gpt2-a" in b.text(".banner")
    rows = b.css(".ranking tbody tr")
    assert [r.find_elements("css selector", "td")[1].text for r in rows][:1] == ["report-gpt2-a"]
    assert len(b.css("svg.ranking .bar")) == len(rows) == 2
    b.screenshot("03-report-identify")
    _no_console_errors(b, "identify")

    b.get(f"/ui/jobs/{jobs['failed']['id']}")
    assert b.text(".banner .big") == "FAILED"
    assert "model_load_error" in b.text(".card.error")
    assert jobs["failed"]["error"]["message"][:40] in b.text(".card.error")
    b.screenshot("04-report-failed")
    _no_console_errors(b, "failed")

    # The jobs list: alpha's four jobs, never beta's; the status filter.
    b.get("/ui/jobs")
    listed = b.text("table.jobs")
    assert all(jobs[n]["id"][:8] in listed for n in ("same", "different", "identify", "failed"))
    assert jobs["beta"]["id"][:8] not in listed
    b.screenshot("05-jobs")
    [failed_filter] = [a for a in b.css("a.filter") if a.text == "Failed"]
    b.click(failed_filter)
    assert urlsplit(b.driver.current_url).query == "status=failed"
    statuses = [e.text for e in b.css("table.jobs .status")]
    assert statuses and set(statuses) == {"failed"}
    _no_console_errors(b, "jobs")

    # Another tenant's job answers 404, exactly like a job that does not exist.
    for job_id in (jobs["beta"]["id"], "00000000-0000-0000-0000-000000000000"):
        b.get(f"/ui/jobs/{job_id}")
        messages = b.drain()  # only the 404 itself may be reported
        assert all("404" in m["message"] for m in messages), messages
        assert b.statuses[b.driver.current_url] == 404
        assert "404" in b.text("h1")
    b.screenshot("06-other-tenant-404")

    # Log out: back to the login form, and the pages redirect there again.
    b.get("/ui/jobs")
    b.click(b.css("header form button")[0])
    assert urlsplit(b.driver.current_url).path == "/ui/login"
    b.get(f"/ui/jobs/{diff['id']}")
    assert urlsplit(b.driver.current_url).path == "/ui/login"
    _no_console_errors(b, "logout")

    # No request left the coordinator. chrome:, data: and about: URLs (the start page
    # chromedriver opens, the browser's own new-tab resources) never touch a network.
    network = [u for u in b.requests if urlsplit(u).scheme not in ("chrome", "data", "about")]
    origins = {f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in network}
    assert origins == {b.base}, origins
    assert f"{b.base}/ui/static/report.css" in b.requests


# ----------------------------------------------------------------------------- sessions
def _login(app: Any, token: str) -> Any:
    web = app.test_client()
    page = web.get("/ui/login").get_data(as_text=True)
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]
    resp = web.post("/ui/login", data={"api_key": token, "csrf_token": csrf, "next": ""})
    return web, resp


def test_login_needs_csrf_and_a_valid_key(app: Any, keys: dict[str, str], jobs: Any) -> None:
    web = app.test_client()
    resp = web.post("/ui/login", data={"api_key": keys["alpha"]})  # no CSRF token
    assert resp.status_code == 400 and "form expired" in resp.get_data(as_text=True)
    assert web.get("/ui/jobs").status_code == 302  # and not logged in
    _web, resp = _login(app, "rev_0000000000000000_" + "x" * 43)
    assert resp.status_code == 401 and "Invalid or revoked" in resp.get_data(as_text=True)
    web, resp = _login(app, keys["alpha"])
    assert resp.status_code == 302 and resp.headers["Location"] == "/ui/jobs"
    assert web.post("/ui/logout").status_code == 400  # no CSRF token: still logged in
    assert web.get("/ui/jobs").status_code == 200
    # The API never accepts the browser's cookie.
    assert web.get(f"/v1/jobs/{jobs['same']['id']}").status_code == 401


def test_a_revoked_key_logs_its_sessions_out(app: Any, jobs: Any) -> None:
    from rev_tasks import apikeys
    from rev_tasks.db.session import session_scope
    from tests.integration.farm import create_key

    token = create_key("alpha", "read")
    web, _resp = _login(app, token)
    assert web.get(f"/ui/jobs/{jobs['same']['id']}").status_code == 200
    with session_scope() as s:
        assert apikeys.revoke(s, token.split("_")[1])
    resp = web.get(f"/ui/jobs/{jobs['same']['id']}")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/ui/login")


def test_pages_send_a_strict_csp(app: Any, keys: dict[str, str], jobs: Any) -> None:
    web, _ = _login(app, keys["alpha"])
    resp = web.get(f"/ui/jobs/{jobs['same']['id']}")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "style-src 'self'" in csp and "script" not in csp
    assert "<script" not in resp.get_data(as_text=True)


# ----------------------------------------------------------------------------- certificates
def _rev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_certificates_verify_and_fail_clearly(
    client_for: Any, keys: dict[str, str], jobs: Any, tmp_path: Path, signing_key: Any
) -> None:
    from rev_tasks import certificates as C

    alpha, beta = client_for(keys["alpha"]), client_for(keys["beta"])
    anonymous = client_for(None)
    key = anonymous.get("/v1/certificates/key")
    assert key.status_code == 200 and key.headers["Rev-Key-Id"] == C.keyid(signing_key)
    (tmp_path / "farm.pem").write_bytes(key.data)
    listed = anonymous.get("/v1/certificates/keys").get_json()["keys"]
    assert [k["keyid"] for k in listed] == [C.keyid(signing_key)] and listed[0]["current"]
    assert anonymous.get(f"/v1/jobs/{jobs['same']['id']}/certificate").status_code == 401

    files = {}
    for name in ("same", "different"):
        job_id = jobs[name]["id"]
        cert = alpha.get(f"/v1/jobs/{job_id}/certificate")
        assert cert.status_code == 200
        files[name] = tmp_path / f"{name}.cert.json"
        files[name].write_bytes(cert.data)
        transcript = alpha.get(f"/v1/jobs/{job_id}/transcript")
        (tmp_path / f"{name}.transcript.json").write_bytes(transcript.data)
        # Another tenant cannot fetch it: the same 404 as for a missing job.
        assert beta.get(f"/v1/jobs/{job_id}/certificate").status_code == 404
    assert alpha.get(f"/v1/jobs/{jobs['failed']['id']}/certificate").status_code == 404

    pem = str(tmp_path / "farm.pem")
    ok = _rev("certificate", "verify", str(files["same"]), "--public-key", pem,
              "--transcript", str(tmp_path / "same.transcript.json"))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "valid certificate" in ok.stdout and "SAME" in ok.stdout
    assert jobs["same"]["result"]["transcript_root"] in ok.stdout

    swapped = _rev("certificate", "verify", str(files["same"]), "--public-key", pem,
                   "--transcript", str(tmp_path / "different.transcript.json"))  # fmt: skip
    assert swapped.returncode == 1
    assert "another job's transcript" in swapped.stderr and "Traceback" not in swapped.stderr

    raw = bytearray(files["different"].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped = tmp_path / "flipped.json"
    flipped.write_bytes(bytes(raw))
    bad = _rev("certificate", "verify", str(flipped), "--public-key", pem)
    assert bad.returncode == 1 and "certificate INVALID" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    # The subject is the weights the inference digested, for verify and identify jobs alike.
    identify = tmp_path / "identify.cert.json"
    identify.write_bytes(alpha.get(f"/v1/jobs/{jobs['identify']['id']}/certificate").data)
    for name, path in (("same", files["same"]), ("identify", identify)):
        subject = C.verify(path.read_bytes(), C.load_public_key(key.data)).statement["subject"][0]
        recorded = jobs[name]["result"]["candidate_digest"]
        assert subject["digest"] == {C.SUBJECT_DIGEST: recorded}
        assert recorded == C.weights_digest(jobs[name]["request"]["candidate"]["path"])

    missing = _rev("certificate", "verify", str(tmp_path / "nope.json"), "--public-key", pem)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_rev_report_writes_one_self_contained_file(
    server: str, keys: dict[str, str], jobs: Any, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    env = {"REV_API_URL": server, "REV_API_KEY": keys["alpha"]}
    proc = _rev("report", jobs["different"]["id"], "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    assert "<style>" in html and "<link" not in html and "<script" not in html
    assert "DIFFERENT" in html and jobs["different"]["result"]["transcript_root"] in html
    assert html.count("data-challenge=") == 2 * jobs["different"]["result"]["challenges_used"]
    other = _rev("report", jobs["beta"]["id"], "-o", str(tmp_path / "x.html"), env=env)
    assert other.returncode == 2 and "404" in other.stderr
