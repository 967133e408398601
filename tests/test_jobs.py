"""Ray jobs end to end: a real head started for this module (token auth on, bound to 127.0.0.1,
its own temp dir and ports), a tiny training submitted with `jobs/submit.py`, a failing job's
exit status, and the token lookup. The head is stopped by its own PIDs, never `ray stop`, so the
suite's in-process Ray and anyone else's Ray are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import conftest
from fedray import submit
from fedray.submit import SubmitError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(16)

# The tiny_config of conftest as --set flags: 2 hospitals, 1 round, 32 px, 240 synthetic smears.
TINY = {**conftest.TINY, "training.local_epochs": 1}


@dataclass(frozen=True)
class Head:
    url: str
    temp_dir: str
    session: int


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _psutil():
    """Ray's vendored psutil (importing ray puts it on sys.path)."""
    import ray  # noqa: F401

    import psutil

    return psutil


def head_processes(head: Head) -> list:
    """The head's processes: its session (all that `ray start` spawned), their descendants
    (job drivers run in sessions of their own), and anything running from its temp dir."""
    psutil = _psutil()
    found = {}
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
            if head.temp_dir in text or os.getsid(proc.pid) == head.session:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    for proc in list(found.values()):
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def stop_head(head: Head) -> None:
    """SIGTERM the head's processes by PID, then SIGKILL what is left after a grace period."""
    psutil = _psutil()

    for _ in range(3):
        procs = head_processes(head)
        if not procs:
            return
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def head():
    _psutil()  # the teardown needs it: fail before starting anything
    temp_dir = tempfile.mkdtemp(prefix="frj", dir="/tmp")  # short: Ray's socket paths
    (gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node_manager,
     object_manager) = free_ports(9)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    start = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port",
         str(env_agent), "--metrics-export-port", str(metrics), "--node-manager-port",
         str(node_manager), "--object-manager-port", str(object_manager), "--num-cpus", "2",
         "--temp-dir", temp_dir, "--disable-usage-stats", "--include-log-monitor", "false"],
        env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    head = Head(f"http://127.0.0.1:{dashboard}", temp_dir, start.pid)
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, f"ray start failed:\n{out}"
        yield head
    finally:
        if start.poll() is None:
            start.kill()
        stop_head(head)
        left = head_processes(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"head processes still running: {[p.pid for p in left]}"


def run_submit(head: Head, *entrypoint: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """`python jobs/submit.py` from the repo root, with the head's token in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_TOKEN=TOKEN, RAY_API_SERVER_ADDRESS=head.url)
    return subprocess.run([sys.executable, "jobs/submit.py", "--", *entrypoint], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def train_args(output_dir: Path, **extra: object) -> list[str]:
    sets = {**TINY, "output_dir": str(output_dir), **extra}
    args = ["python", "jobs/train.py", "--config", "configs/demo.yaml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_tiny_training_runs_as_a_job(head, tmp_path):
    done = run_submit(head, *train_args(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCEEDED" in done.stderr
    assert "round 1/1" in done.stdout  # the driver's progress line, streamed back
    runs = list(tmp_path.glob("tiny-*"))
    assert len(runs) == 1, runs
    assert (runs[0] / "model.safetensors").stat().st_size > 0
    final = json.loads((runs[0] / "metrics.json").read_text())
    assert "test" in final


def test_failing_job_propagates_its_exit_status_and_error(head, tmp_path, monkeypatch, capsys):
    from fedray.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    bad = train_args(tmp_path, **{"federation.rounds": "many"})
    status = main(["submit", "--address", head.url, "--", *bad])
    out, err = capsys.readouterr()
    assert status == 2, out + err  # `fedray train`'s status for a user error
    assert "FAILED (exit status 2)" in err
    assert "federation.rounds: Input should be a valid integer" in out  # streamed job log
    assert not list(tmp_path.glob("tiny-*"))


def test_head_listens_on_loopback_only(head):
    psutil = _psutil()

    listening = set()
    for proc in head_processes(head):
        try:
            listening |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert len(listening) >= 3  # gcs, dashboard, raylet at least
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listening), listening


def test_missing_token_names_where_it_looked(head, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(submit, "DEFAULT_TOKEN_FILE", tmp_path / "auth_token")
    with pytest.raises(SubmitError, match="requires an auth token") as exc:
        submit.connect(head.url)
    for place in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token")):
        assert place in str(exc.value)


def test_wrong_token_is_rejected_by_name(head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-" + TOKEN)
    with pytest.raises(SubmitError, match="rejected the auth token from RAY_AUTH_TOKEN"):
        submit.connect(head.url)


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    default = tmp_path / "auth_token"
    default.write_text("from-file\n")
    monkeypatch.setattr(submit, "DEFAULT_TOKEN_FILE", default)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token()[0].value == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert submit.find_token()[0] == submit.Token("from-file", str(default))
    path = tmp_path / "other"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert submit.find_token()[0].value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="cannot be read"):
        submit.find_token()


@pytest.mark.parametrize("mode,sent", [("token", True), ("disabled", False), (None, False),
                                       ("unknown", False)])
def test_token_goes_only_to_a_dashboard_that_asks_for_it(mode, sent, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "local-secret")
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda url: mode)
    headers, token = submit.auth_headers("https://head:8265")
    assert (headers == {"Authorization": "Bearer local-secret"}) is sent
    assert (token is not None) is sent


@pytest.mark.parametrize("url,safe", [
    ("https://ray.example:8265", True),
    ("HTTPS://ray.example", True),
    ("http://127.0.0.1:8265", True),
    ("http://127.3.2.1:8265", True),
    ("http://[::1]:8265", True),
    ("http://[::ffff:127.0.0.1]:8265", True),
    ("http://localhost:8265", True),
    ("http://LOCALHOST.:8265", True),
    ("http://head:8265", False),
    ("http://10.0.0.1:8265", False),
    ("http://127.0.0.1.example.com:8265", False),
    ("http://127.0.0.1@evil.example:8265", False),   # userinfo, the host is evil.example
    ("http://evil.example\\@127.0.0.1:8265", False),  # parsers disagree on the host
    ("http://0.0.0.0:8265", False),
    ("http://[::]:8265", False),
])
def test_token_channel_is_https_or_loopback(url, safe):
    assert submit.token_channel_is_safe(url) is safe


@pytest.fixture
def token_cluster(monkeypatch):
    """A dashboard that says it wants a token, and a token in this shell; no network."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "local-secret")
    asked = []
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda url: asked.append(url) or "token")
    monkeypatch.setattr(submit, "ray_sends_token_itself", lambda: False)
    return asked


@pytest.mark.parametrize("url", ["http://head:8265", "http://10.1.2.3:8265",
                                 "http://127.0.0.1@head:8265"])
def test_token_refused_over_plain_http_to_a_remote_host(url, token_cluster):
    with pytest.raises(SubmitError) as exc:
        submit.auth_headers(url)
    message = str(exc.value)
    assert url in message and "--insecure-http" in message and "https://" in message
    assert "local-secret" not in message


def test_insecure_http_sends_the_token_when_asked(token_cluster):
    headers, token = submit.auth_headers("http://head:8265", insecure_http=True)
    assert headers == {"Authorization": "Bearer local-secret"}
    assert token.source == "RAY_AUTH_TOKEN"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8265", "http://localhost:8265",
                                 "http://[::1]:8265", "https://head:8265"])
def test_token_sent_over_https_or_to_loopback(url, token_cluster):
    assert submit.auth_headers(url)[0] == {"Authorization": "Bearer local-secret"}


def test_plain_http_without_token_auth_needs_no_flag(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "local-secret")
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda url: "disabled")
    monkeypatch.setattr(submit, "ray_sends_token_itself", lambda: False)
    assert submit.auth_headers("http://head:8265") == ({}, None)
    # but Ray's own client would add the token to every request under RAY_AUTH_MODE=token
    monkeypatch.setattr(submit, "ray_sends_token_itself", lambda: True)
    with pytest.raises(SubmitError, match=r"RAY_AUTH_MODE=token.*--insecure-http"):
        submit.auth_headers("http://head:8265")
    assert submit.auth_headers("https://head:8265") == ({}, None)


@pytest.mark.parametrize("mode,adds", [("token", True), ("TOKEN", True), ("disabled", False),
                                       ("", False)])
def test_ray_sends_token_itself_matches_rays_client(mode, adds):
    """The check asks Ray, in a fresh process (Ray reads RAY_AUTH_MODE once per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN="local-secret")
    code = ("from fedray import submit\n"
            "from ray._private.authentication.http_token_authentication import "
            "get_auth_headers_if_auth_enabled as ray_headers\n"
            "print(submit.ray_sends_token_itself(), bool(ray_headers({})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(adds), str(adds)]


def test_submit_cli_has_the_insecure_http_flag():
    from fedray.cli import build_parser

    args = build_parser().parse_args(["submit", "--insecure-http", "--", "python", "-V"])
    assert args.insecure_http is True
    assert build_parser().parse_args(["submit", "--", "python", "-V"]).insecure_http is False


def test_runtime_env_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("env_vars: {A: 1\npip: [timm\n")
    with pytest.raises(SubmitError, match=r"(?s)env\.yaml is not valid YAML.*line 1, column 11"):
        submit.load_runtime_env(path)


def test_upload_leaves_out_venv_runs_and_big_files(tmp_path):
    (tmp_path / "fedray" / "data").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "big.bin").write_bytes(b"0" * 2_000_000)
    (tmp_path / "weights.bin").write_bytes(b"0" * 2_000_000)
    (tmp_path / "small.py").write_text("x = 1\n")
    env = submit.build_runtime_env(working_dir=tmp_path, pip=["timm"], env={"A": "1"},
                                   big_file_mb=1)
    assert env["working_dir"] == str(tmp_path.resolve())
    assert {".venv/", ".git/", "/runs/", "/data/"} <= set(env["excludes"])
    assert "/weights.bin" in env["excludes"] and "/runs/big.bin" not in env["excludes"]
    assert "fedray/data/" not in env["excludes"]  # the package's own data module is code
    assert env["pip"] == ["timm"] and env["env_vars"] == {"A": "1"}
    installed = submit.build_runtime_env(working_dir=None, installed=True)
    assert "working_dir" not in installed
    with pytest.raises(SubmitError, match="--installed"):
        submit.build_runtime_env(working_dir=tmp_path, installed=True)


def test_dashboard_url_order(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.dashboard_url() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert submit.dashboard_url() == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example/")
    assert submit.dashboard_url() == "https://ray.example"
    assert submit.dashboard_url("http://head:8265") == "http://head:8265"


def test_ctrl_c_stops_the_job(head):
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "fedray.cli", "submit", "--address", head.url, "--job-id",
         f"sleeper-{secrets.token_hex(4)}", "--", "python", "-c",
         "import time; print('sleeping', flush=True); time.sleep(300)"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Event()

    def watch() -> None:  # a reader thread, so that waiting for the job's line has a deadline
        for line in waiting.stdout:
            if line.startswith("sleeping"):
                started.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not started.wait(timeout=180):
            waiting.kill()
            pytest.fail(f"the job printed nothing in 180 s: {waiting.stderr.read()[-2000:]}")
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == submit.INTERRUPTED_STATUS, err
    assert "STOPPED" in err


@pytest.mark.parametrize("command", ["train", "tune", "export", "submit"])
def test_job_scripts_forward_to_their_subcommand(command, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [f"jobs/{command}.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "jobs" / f"{command}.py"), run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fedray {command}")


def test_export_job_packages_a_tiny_run(shard_dir, tmp_path, monkeypatch):
    from conftest import local_coordinator

    from fedray.artifacts.package import verify_package

    run_dir = tmp_path / "run"
    coordinator = local_coordinator(run_dir, shard_dir)
    (run_dir / "config.yaml").write_text(coordinator.config.to_yaml())
    while coordinator.run_round() is not None:
        pass
    coordinator.finish()
    assert conftest.run_job_script("export", [str(run_dir), "--output", str(tmp_path / "pkg")],
                                   monkeypatch) == 0
    card = verify_package(tmp_path / "pkg")
    assert card["source_run"] == "run" and "model.ts" in card["files"]
