"""Submit a command to a Ray cluster as a Ray job: upload the code, stream the logs, return the
job's exit status. The same entrypoint runs on a laptop's local Ray and on a remote cluster.

Token authentication follows Ray 2.60: the dashboard says whether it wants a token
(`/api/authentication_mode`, a public endpoint); only if it says "token" is the token read
where Ray reads it (RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)
and sent as a bearer token, so submission does not depend on RAY_AUTH_MODE being set in this
shell, and a cluster that did not ask for the token never receives it.

That answer comes unauthenticated, so it cannot vouch for the channel: the token only travels
over https or to a loopback address (127.0.0.0/8, ::1, localhost), where no one on the network
can read it. Plain http to any other host is refused, naming the address, unless the caller
passes --insecure-http.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
INSECURE_FLAG = "--insecure-http"

# Never uploaded with the working dir (gitignore patterns relative to it; a leading / anchors
# at its root); Ray leaves .gitignore'd files out as well, and big_files() adds large ones.
UPLOAD_EXCLUDES = (".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
                   "/runs/", "/data/", "/explanations/")
_SKIP_ANYWHERE = {".venv", "venv", ".git", "__pycache__", ".pytest_cache", "node_modules"}
_SKIP_AT_ROOT = {"runs", "data", "explanations"}
BIG_FILE_MB = 10.0

# A failed job whose driver left no exit code (it did not start, or was stopped).
FAILED_STATUS = 1
INTERRUPTED_STATUS = 130


class SubmitError(ValueError):
    """A submission that cannot go ahead (address, token, runtime env); the message says why."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str


def dashboard_url(address: str | None = None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if candidate:
            url = candidate.rstrip("/")
            break
    else:
        url = DEFAULT_ADDRESS
    if url.startswith("ray://"):
        raise SubmitError(f"{url} is a Ray Client address; give the dashboard's, "
                          f"e.g. {DEFAULT_ADDRESS}")
    return url if "://" in url else f"http://{url}"


def find_token() -> tuple[Token | None, list[str]]:
    """The auth token, looked up in Ray's order, and where it looked (for the error message).

    A RAY_AUTH_TOKEN_PATH that is set but unreadable or empty is an error, as it is for Ray,
    rather than a silent fall-back to the default file.
    """
    looked = []
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN"), looked
    looked.append("RAY_AUTH_TOKEN (not set)")
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_var:
        path = Path(path_var).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_var} cannot be read "
                              f"({exc.strerror}); fix or unset it") from None
        if not value:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_var} is empty; fix or unset it")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path_var}"), looked
    looked.append("RAY_AUTH_TOKEN_PATH (not set)")
    default = DEFAULT_TOKEN_FILE.expanduser()
    try:
        value = default.read_text().strip()
    except FileNotFoundError:
        looked.append(f"{default} (no such file)")
        return None, looked
    except OSError as exc:
        looked.append(f"{default} ({exc.strerror})")
        return None, looked
    if not value:
        looked.append(f"{default} (empty)")
        return None, looked
    return Token(value, str(default)), looked


def cluster_auth_mode(url: str) -> str | None:
    """What the dashboard asks of clients: "token", "disabled", or None if it does not say
    (a Ray older than 2.52)."""
    import requests

    try:
        response = requests.get(f"{url}/api/authentication_mode", timeout=15)
    except requests.RequestException as exc:
        raise SubmitError(f"cannot reach the Ray dashboard at {url} ({type(exc).__name__}); "
                          "is the cluster up? Set the address with --address, "
                          "RAY_API_SERVER_ADDRESS or RAY_ADDRESS") from None
    if response.status_code != 200:
        return None
    try:
        return response.json().get("authentication_mode")
    except ValueError:
        return None


def url_host(url: str) -> str | None:
    """The host `url` points at, lower-cased, or None when it has none or when Python's URL
    parser and the one requests sends with (urllib3) disagree about it (``a\\@b``)."""
    from urllib.parse import urlsplit

    from urllib3.util import parse_url

    try:
        ours = urlsplit(url).hostname
        theirs = parse_url(url).host
    except ValueError:
        return None
    if not ours or not theirs or "\\" in url:
        return None
    theirs = theirs.strip("[]").lower()
    return ours if ours == theirs else None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) or the name localhost; no DNS lookup."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def token_channel_is_safe(url: str) -> bool:
    """Whether a token sent to `url` stays private: https, or any scheme to a loopback host."""
    from urllib.parse import urlsplit

    host = url_host(url)
    if host is None:
        return False
    return urlsplit(url).scheme.lower() == "https" or is_loopback(host)


def ray_sends_token_itself() -> bool:
    """Whether Ray's own client adds this shell's token to every request (RAY_AUTH_MODE=token
    when the process started), whatever fedray decides."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return is_token_auth_enabled()


def _insecure_channel(url: str, why: str) -> SubmitError:
    host = url_host(url)
    where = f"host {host}" if host else "a host that URL parsers read differently"
    return SubmitError(
        f"{why}, but {url} is neither https nor a loopback address ({where}): the token would "
        "cross the network unencrypted. Use an https:// address (a TLS proxy in front of the "
        f"dashboard), or pass {INSECURE_FLAG} to send it anyway on a network you trust")


def auth_headers(url: str, *, insecure_http: bool = False) -> tuple[dict[str, str], Token | None]:
    """The Authorization header the cluster needs: the token only to a dashboard that says it
    uses token auth, so a local token never goes to a cluster that did not ask for it, and only
    over https or to a loopback address unless `insecure_http`."""
    safe = insecure_http or token_channel_is_safe(url)
    if cluster_auth_mode(url) != "token":
        if not safe and ray_sends_token_itself():
            raise _insecure_channel(url, "RAY_AUTH_MODE=token makes Ray send this shell's "
                                         "token with every request (unset it if the cluster "
                                         "does not need one)")
        return {}, None
    if not safe:
        raise _insecure_channel(url, f"the Ray cluster at {url} asks for an auth token")
    token, looked = find_token()
    if token is None:
        raise SubmitError(
            f"the Ray cluster at {url} requires an auth token and none was found; looked "
            f"in {', '.join(looked)}. Copy the head's token (`ray get-auth-token` on the "
            "head) into ~/.ray/auth_token, or export RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return {"Authorization": f"Bearer {token.value}"}, token


def connect(address: str | None = None, *, insecure_http: bool = False) -> JobSubmissionClient:
    """A Jobs API client for the cluster, authenticated if the cluster wants it (the token
    only over https or to loopback unless `insecure_http`)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    headers, token = auth_headers(url, insecure_http=insecure_http)
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        if token is None:
            raise SubmitError(f"the Ray cluster at {url} asks for authentication, but its "
                              "dashboard does not say it uses token auth "
                              "(/api/authentication_mode), so no token was sent") from None
        raise SubmitError(f"the Ray cluster at {url} rejected the auth token from "
                          f"{token.source}; use the head's token "
                          "(`ray get-auth-token` on the head)") from None
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {exc}") from None


def big_files(root: Path, limit_mb: float = BIG_FILE_MB) -> list[str]:
    """Files over `limit_mb` under `root` (not in the folders never uploaded), as excludes."""
    limit = limit_mb * 2**20
    found = []
    for folder, dirs, files in os.walk(root):
        skip = _SKIP_ANYWHERE | (_SKIP_AT_ROOT if Path(folder) == root else set())
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder, name)
            try:
                if path.is_file() and path.stat().st_size > limit:
                    found.append("/" + path.relative_to(root).as_posix())
            except OSError:
                continue
    return found


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def load_runtime_env(path: Path | None) -> dict[str, Any]:
    """A runtime_env from a YAML or JSON file (JSON is YAML)."""
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--runtime-env {path}: no such file")
    try:
        with path.open() as stream:  # a stream, so that the YAML error names the file
            loaded = yaml.safe_load(stream) or {}
    except yaml.YAMLError as exc:
        raise SubmitError(f"--runtime-env {path} is not valid YAML or JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (working_dir, pip, "
                          f"env_vars...), got {type(loaded).__name__}")
    return loaded


def build_runtime_env(*, working_dir: Path | None, installed: bool = False,
                      base: dict[str, Any] | None = None, pip: list[str] | None = None,
                      env: dict[str, str] | None = None,
                      big_file_mb: float = BIG_FILE_MB) -> dict[str, Any]:
    """The job's runtime_env: the code to upload (or none: fedray installed on the cluster),
    extra pip packages and environment variables over a base runtime_env."""
    runtime_env = dict(base or {})
    if installed:
        if working_dir is not None or "working_dir" in runtime_env:
            raise SubmitError("--installed runs the cluster's installed fedray; drop "
                              "--working-dir (and working_dir in --runtime-env)")
    elif working_dir is None and "://" in str(runtime_env.get("working_dir", "")):
        pass  # a package already on remote storage (s3://, gs://, https://...zip): no upload
    else:
        root = Path(working_dir or runtime_env.get("working_dir") or ".").expanduser().resolve()
        if not root.is_dir():
            raise SubmitError(f"working dir {root} is not a folder")
        runtime_env["working_dir"] = str(root)
        excludes = [*runtime_env.get("excludes", []), *UPLOAD_EXCLUDES,
                    *big_files(root, big_file_mb)]
        runtime_env["excludes"] = list(dict.fromkeys(excludes))
    if pip:
        current = runtime_env.get("pip") or []
        if isinstance(current, dict):
            runtime_env["pip"] = {**current, "packages": [*current.get("packages", []), *pip]}
        else:
            runtime_env["pip"] = [*current, *pip]
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return runtime_env


def submit(client: JobSubmissionClient, entrypoint: list[str], runtime_env: dict[str, Any],
           job_id: str | None = None) -> str:
    """Start the job; returns its submission id."""
    if not entrypoint:
        raise SubmitError("no entrypoint: put the command after --, e.g. "
                          "fedray submit -- python jobs/train.py --config configs/demo.yaml")
    try:
        return client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                 submission_id=job_id)
    except RuntimeError as exc:
        raise SubmitError(f"the cluster refused the job: {exc}") from None


def stream_logs(client: JobSubmissionClient, job_id: str, out: TextIO) -> bool:
    """Copy the job's logs to `out` until the job ends; True if any line arrived."""
    async def tail() -> bool:
        seen = False
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            seen = seen or bool(chunk)
        return seen

    return asyncio.run(tail())


def wait_until_done(client: JobSubmissionClient, job_id: str,
                    timeout_s: float | None = None) -> JobDetails:
    """Poll until the job is terminal (the log stream can close just before its status flips)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(0.5)


def exit_status(info: JobDetails) -> int:
    """0 for a job that succeeded, else the driver's exit code (1 if it left none)."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else FAILED_STATUS


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None,
           err: TextIO | None = None) -> int:
    """Stream a job to its end and return its exit status; Ctrl-C stops the job."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        streamed = stream_logs(client, job_id, out)
        info = wait_until_done(client, job_id)
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping job {job_id}", file=err, flush=True)
        client.stop_job(job_id)
        info = wait_until_done(client, job_id, timeout_s=30)
        print(f"job {job_id} {info.status.value}", file=err)
        return INTERRUPTED_STATUS
    status = exit_status(info)
    if status:
        message = (info.message or "").strip()
        shown = message if not streamed else message.splitlines()[0] if message else ""
        print(f"job {job_id} {info.status.value} (exit status {status})"
              + (f": {shown}" if shown else ""), file=err)
    else:
        print(f"job {job_id} {info.status.value}", file=err)
    return status


# Ray's per-file INFO lines while it packages and tails; its warnings still show.
_QUIET_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.job.sdk")


def cmd_submit(args: argparse.Namespace) -> int:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    entrypoint = list(args.entrypoint)
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]
    runtime_env = build_runtime_env(
        working_dir=args.working_dir, installed=args.installed,
        base=load_runtime_env(args.runtime_env), pip=args.pip, env=parse_env(args.env))
    client = connect(args.address, insecure_http=args.insecure_http)
    job_id = submit(client, entrypoint, runtime_env, args.job_id)
    url = dashboard_url(args.address)
    print(f"submitted job {job_id} to {url}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {url} {job_id} (with "
              "RAY_AUTH_MODE=token set if the cluster uses tokens)", file=sys.stderr)
        print(job_id)
        return 0
    return follow(client, job_id)


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "submit", help="run a command on a Ray cluster as a Ray job, streaming its logs",
        description="Submit ENTRYPOINT as a Ray job, stream its logs until it ends and exit "
                    "with its status (0: SUCCEEDED). Ctrl-C stops the job. Example: "
                    "fedray submit -- python jobs/train.py --config configs/demo.yaml")
    parser.add_argument("--address", metavar="URL",
                        help="the cluster's dashboard (default: RAY_API_SERVER_ADDRESS, "
                             f"RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument(INSECURE_FLAG, dest="insecure_http", action="store_true",
                        help="send the auth token over plain http to a non-loopback address "
                             "(default: the token only goes over https or to 127.0.0.0/8, "
                             "::1, localhost)")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--working-dir", type=Path, metavar="DIR",
                      help="folder uploaded with the job (default: the current folder; "
                           ".venv, .git, runs, data and files over "
                           f"{BIG_FILE_MB:g} MB are left out)")
    code.add_argument("--installed", action="store_true",
                      help="upload nothing: the cluster's image has fedray installed")
    parser.add_argument("--runtime-env", type=Path, metavar="FILE",
                        help="a Ray runtime_env as YAML or JSON (the options below add to it)")
    parser.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                        help="a pip requirement installed for the job (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the job (repeatable)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return once submitted")
    parser.add_argument("--job-id", metavar="ID", help="the submission id (default: generated)")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER,
                        help="the command, after --")
    parser.set_defaults(func=cmd_submit)
