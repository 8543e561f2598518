"""`mine submit` and `mine jobs`: run a job spec on a remote Ray cluster through the Jobs API.

The cluster gets a copy of this project (its own `mining` package, queries, jobs) plus the
resolved spec as `.submitted-job.yaml`, staged in a temporary directory and uploaded as the
job's `working_dir`, so the code that runs is the code the user has — nothing needs to be
installed on the cluster but the dependencies. The entrypoint is plain `mine run` joining the
cluster (`--address auto`). The job runs in a temporary directory on the head node, so the
store must be an absolute path on storage the workers share, or an object-storage URL (s3://...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_NAME = ".submitted-job.yaml"
MAX_FILE_BYTES = 50 * 2**20  # bigger files (weights, corpora) belong on shared storage, not in every upload
# Never uploaded: history, caches, build output, local stores.
SKIP_NAMES = {".git", "runs", "__pycache__", ".pytest_cache", ".benchmarks", ".mypy_cache", ".ruff_cache",
              ".venv", "venv", "build", "dist", ".ipynb_checkpoints", "node_modules", SPEC_NAME}
SKIP_SUFFIXES = (".egg-info", ".pyc", ".tmp")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# ---------------------------------------------------------------- address and client


def resolve_address(address: str | None) -> str:
    """The dashboard URL: --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when http(s), else local."""
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            value = os.environ.get(var, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
        else:
            return DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if address == "auto" or address.startswith("ray://"):
        raise UserError(f"--address {address!r}: the Jobs API is the Ray dashboard's; give http://HOST:8265")
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    try:
        parts.port  # noqa: B018 -- raises on a malformed port
    except ValueError:
        raise UserError(f"--address {address!r}: bad port; expected http://HOST:8265") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--address {address!r}: expected http://HOST:8265 (the Ray dashboard)")
    return address


def connect(address: str | None) -> tuple[Any, str]:
    """(JobSubmissionClient, url). Probes the port first: the client's own requests have no timeout."""
    url = resolve_address(address)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"no Ray dashboard answers at {url} ({reason}); is the cluster up and the port "
                        f"forwarded (`ray dashboard cluster.yaml`)?") from None
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise UserError(f"the Ray Jobs client is missing ({e}); pip install 'ray[default]'") from None
    logging.getLogger("ray").setLevel(logging.ERROR)  # upload/websocket chatter; failures are reported below
    _use_token_if_present()
    try:
        return JobSubmissionClient(url), url
    except Exception as e:  # ConnectionError, RuntimeError (version/404), JSON errors from a non-Ray server
        if "authentication" in str(e).lower():
            raise UserError(f"{url} wants a Ray auth token: set RAY_AUTH_TOKEN (the cluster's `ray get-auth-token`) "
                            f"or put it in ~/.ray/auth_token") from None
        raise UserError(f"{url} is not a usable Ray dashboard: {_first_line(e)}") from None


def _use_token_if_present() -> None:
    """Send the Ray auth token (RAY_AUTH_TOKEN / ~/.ray/auth_token) like `ray.init` does: Ray >= 2.5x
    clusters require it by default, and the Jobs client only sends it when token mode is switched on."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # an older Ray without token auth
        return
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:
        pass


def _call(url: str, job_id: str, fn: Any, *args: Any) -> Any:
    """A Jobs API call whose failures become one line; a 404 means an unknown job id."""
    try:
        return fn(*args)
    except Exception as e:
        text = str(e)
        if "404" in text or "does not exist" in text:
            raise UserError(f"no job {job_id!r} at {url}; see `mine jobs list --address {url}`") from None
        raise UserError(f"job {job_id}: {_first_line(e)}") from None


# ---------------------------------------------------------------- submit


def project_root() -> Path | None:
    """The source checkout this package runs from, or None when installed into site-packages."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def stage(dest: Path, spec_text: str) -> list[str]:
    """Copy what the job needs into `dest`; return the files left out for their size."""
    skipped: list[str] = []
    root = project_root()
    src, target = (root, dest) if root else (Path(__file__).resolve().parent, dest / "mining")

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            path = Path(folder) / name
            if name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES) or path.is_symlink():
                out.add(name)
            elif path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
                out.add(name)
                skipped.append(str(path.relative_to(src)))
        return out

    shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
    (dest / SPEC_NAME).write_text(spec_text)
    return skipped


def cluster_store(spec: Any, override: str | None) -> str:
    from .spec import store_path

    raw = override or spec.store or f"runs/{spec.name}"
    path = store_path(spec, override)
    if isinstance(path, str):  # object storage (s3://...): every node reaches it with its own credentials
        return path
    if not path.is_absolute():
        raise UserError(f"store: {raw!r} is relative, but the job runs in a temporary directory on the cluster; "
                        f"give an absolute path on shared storage, e.g. --store /shared/runs/{spec.name}")
    return str(path)


def entrypoint(store: str, resume: bool, overwrite: bool) -> str:
    cmd = ["python", "-m", "mining.cli", "run", SPEC_NAME, "--address", "auto", "--no-progress", "--store", store]
    cmd += ["--resume"] * resume + ["--overwrite"] * overwrite
    return shlex.join(cmd)


def submit(job: str, address: str | None, overrides: list[str], store: str | None, *, resume: bool = False,
           overwrite: bool = False) -> tuple[Any, str, str]:
    """Validate the spec here, upload project + spec, start the job. Returns (client, url, job id)."""
    from .spec import load_spec

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    spec = load_spec(job, overrides)  # bad specs fail here, not minutes later on the cluster
    store_dir = cluster_store(spec, store)
    spec_text = yaml.safe_dump({**spec.to_dict(), "store": store_dir}, sort_keys=False)
    client, url = connect(address)
    with tempfile.TemporaryDirectory(prefix="mine-submit-") as tmp:
        for path in stage(Path(tmp), spec_text):
            print(f"note: not uploaded (over {MAX_FILE_BYTES >> 20} MiB): {path}", file=sys.stderr)
        runtime_env = {
            "working_dir": tmp,
            # Offline by contract; quiet logs so `mine jobs logs` shows the run's own lines.
            "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                         "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        }
        try:
            job_id = client.submit_job(entrypoint=entrypoint(store_dir, resume, overwrite), runtime_env=runtime_env,
                                       metadata={"job_name": spec.name, "store": store_dir})
        except Exception as e:
            raise UserError(f"submitting to {url} failed: {_first_line(e)}") from None
    return client, url, job_id


# ---------------------------------------------------------------- following


def follow(client: Any, url: str, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    _call(url, job_id, client.get_job_status, job_id)  # unknown ids fail before the websocket opens
    try:
        asyncio.run(tail())
    except UserError:
        raise
    except Exception as e:  # a dropped websocket: fall back to polling below
        print(f"note: log stream ended early ({_first_line(e)}); waiting for the job to finish", file=sys.stderr)
    while (status := status_of(client, url, job_id)) not in TERMINAL:
        time.sleep(1.0)
    return status


def status_of(client: Any, url: str, job_id: str) -> str:
    return str(_call(url, job_id, client.get_job_status, job_id).value)


def check_finished(client: Any, url: str, job_id: str, status: str) -> None:
    if status != "SUCCEEDED":
        info = _call(url, job_id, client.get_job_info, job_id)
        raise UserError(f"job {job_id} {status}: {_first_line(info.message or 'no message')}")


def stop(client: Any, url: str, job_id: str, wait_s: float = 30.0) -> str:
    """Ask the job to stop and wait (a while) for it to end; return its status."""
    _call(url, job_id, client.stop_job, job_id)
    deadline = time.monotonic() + wait_s
    while (status := status_of(client, url, job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def describe(info: Any) -> str:
    meta = info.metadata or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    job_id = info.submission_id or info.job_id or "-"
    return f"{job_id:<28} {str(info.status.value):<10} {when}  {meta.get('job_name', '-')} -> {meta.get('store', '-')}"


def _first_line(e: BaseException | str) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
