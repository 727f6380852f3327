"""The team stack on one machine: an S3 store (SeaweedFS), PostgreSQL and an MLflow server
with logins, all on 127.0.0.1, with their data under one folder.

It is what a team runs on real infrastructure (a bucket, a managed PostgreSQL, ``mlflow
server`` behind TLS), small enough to try on a laptop and to test against: the MLflow server
keeps runs in PostgreSQL, proxies artifacts to the bucket (clients need no S3 credentials)
and asks for a login (MLflow's ``basic-auth`` app); DVC's remote is the same bucket.

``up`` is idempotent: it starts only the services that are not running, on the ports and
data they had. ``down`` stops exactly the processes ``up`` recorded (their pid and start
time), each with its process group. Secrets are generated once, kept in ``secrets.json``
(mode 600) in the folder, and reach the servers through environment variables and a
``.pgpass`` file, never a command line or a log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ran.errors import RanError
from ran.outputs import atomic_write

SERVICES = ("seaweedfs", "postgres", "mlflow")
BUCKET = "ran"
ARTIFACTS = f"s3://{BUCKET}/mlflow"  # the MLflow server's artifact destination
DVC_REMOTE_URL = f"s3://{BUCKET}/dvc"
DVC_REMOTE = "team"
PG_USER = "ran"
MLFLOW_USER = "admin"
POSTGRES_BIN = Path("/usr/lib/postgresql")
MAX_PORT = 55535  # SeaweedFS also listens on each port + 10000 (gRPC)
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
SEAWEEDFS_STOP_S = 3.0


def default_folder() -> Path:
    """``RAN_STACK_DIR``, else a folder the PostgreSQL user can reach when run as root
    (PostgreSQL refuses to run as root, so its data belongs to the ``postgres`` user), else
    the user's data folder."""
    if os.environ.get("RAN_STACK_DIR"):
        return Path(os.environ["RAN_STACK_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/ran/stack")
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "ran" / "stack"


@dataclass(frozen=True)
class Stack:
    """One stack's folder: ``stack.json`` (ports, pids), ``secrets.json``, each service's
    data and log."""

    folder: Path

    @property
    def state_file(self) -> Path:
        return self.folder / "stack.json"

    @property
    def secrets_file(self) -> Path:
        return self.folder / "secrets.json"

    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"ports": {}, "pids": {}}
        return json.loads(self.state_file.read_text())

    def save_state(self, state: dict[str, Any]) -> None:
        text = json.dumps(state, indent=2) + "\n"
        atomic_write(self.state_file, lambda tmp: tmp.write_text(text))

    def secrets(self) -> dict[str, str]:
        """The stack's credentials, made once (mode 600)."""
        if self.secrets_file.is_file():
            return json.loads(self.secrets_file.read_text())
        made = {
            "s3_access_key": "ran" + secrets.token_hex(8),
            "s3_secret_key": secrets.token_urlsafe(24),
            "postgres_password": secrets.token_urlsafe(24),
            "mlflow_password": secrets.token_urlsafe(18),
            "flask_secret_key": secrets.token_hex(32),  # the UI's CSRF tokens
        }

        def write(tmp: Path) -> None:
            tmp.touch(mode=0o600)
            tmp.write_text(json.dumps(made, indent=2) + "\n")

        atomic_write(self.secrets_file, write)
        return made

    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.state()['ports']['mlflow']}"

    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state()['ports']['s3']}"

    def environment(self) -> dict[str, str]:
        """What a client sets to log to this stack: the server and the login."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri(),
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secrets()["mlflow_password"],
        }

    def s3_client(self, retries: int | None = None) -> Any:
        """A boto3 S3 client of the stack's bucket, with its credentials."""
        import boto3
        from botocore.config import Config

        env = self.s3_environment()
        config = None
        if retries is not None:  # a probe: fail fast
            config = Config(retries={"max_attempts": retries}, connect_timeout=2, read_timeout=5)
        return boto3.client(
            "s3",
            endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            config=config,
        )

    def s3_environment(self) -> dict[str, str]:
        """The bucket's credentials and endpoint, as boto3, DVC and MLflow read them."""
        keys = self.secrets()
        return {
            "AWS_ACCESS_KEY_ID": keys["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": keys["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint(),
        }


# --- processes -----------------------------------------------------------------------------


def _alive(record: dict[str, Any] | None) -> bool:
    """Whether the process ``record`` names (pid and start time) is still that process."""
    import psutil

    if not record:
        return False
    try:
        process = psutil.Process(record["pid"])
        same = abs(process.create_time() - record["started"]) < 1.0
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _spawn(
    stack: Stack, name: str, args: list[str], env: dict[str, str], user: str | None = None
) -> dict[str, Any]:
    """Start ``args`` in a session of its own (so that ``down`` stops its children too),
    logging to ``<name>.log``; returns its record (pid, start time)."""
    import psutil

    log = open(stack.folder / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
    with log:
        process = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            cwd=stack.folder,
        )
    return {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}


def _wait_until(ready: Any, what: str, record: dict[str, Any], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if not _alive(record):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise RanError(f"{what} exited while starting: {' '.join(tail) or 'no output'} ({log})")
        time.sleep(0.3)
    raise RanError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s (its log: {log})")


def _stop(record: dict[str, Any] | None, sig: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop the process ``record`` names and every process of its group: ``sig`` first,
    SIGKILL after ``timeout`` seconds."""
    import psutil

    if not _alive(record):
        return
    pgid = record["pid"]  # a session leader: its pid is its group's id

    def group() -> list[psutil.Process]:
        """The group's live processes; its dead ones that are this process's children
        (``up`` ran here) are reaped, others' zombies left to their parents."""
        members = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) != pgid:
                    continue
                if process.status() == psutil.STATUS_ZOMBIE:
                    with suppress(ChildProcessError):
                        os.waitpid(process.pid, os.WNOHANG)
                    continue
                members.append(process)
            except (ProcessLookupError, psutil.Error):
                continue
        return members

    os.kill(record["pid"], sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.is_running() for p in group()):
        if not _alive(record):  # the leader is gone: end what it left in its group
            for process in group():
                process.terminate()
        time.sleep(0.2)
    for process in group():
        process.kill()
    psutil.wait_procs(group(), timeout=5)


def _free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` ports free now on 127.0.0.1, each with port + 10000 free too (SeaweedFS's
    gRPC), all below :data:`MAX_PORT`."""
    import random

    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, MAX_PORT - 10000)
        if port in taken or port in ports or any(abs(port - p) == 10000 for p in ports):
            continue
        if not _answers(port) and not _answers(port + 10000):
            ports.append(port)
    return ports


# --- the services --------------------------------------------------------------------------


def _executable(name: str) -> str:
    """A console script of this environment (``weed``, ``mlflow``), else one on PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RanError(f"`{name}` not found: run `make setup` (requirements.lock installs it)")
    return found


def _postgres_bin(tool: str) -> Path:
    versions = sorted(POSTGRES_BIN.glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for folder in versions:
        if (folder / tool).exists():
            return folder / tool
    raise RanError(
        f"PostgreSQL's {tool} not found under {POSTGRES_BIN}: apt-get install postgresql "
        "(`make setup` does it as root)"
    )


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user."""
    return "postgres" if os.geteuid() == 0 else None


def _start_seaweedfs(stack: Stack, ports: dict[str, int]) -> dict[str, Any]:
    keys = stack.secrets()
    config = {
        "identities": [
            {
                "name": "ran",
                "credentials": [
                    {"accessKey": keys["s3_access_key"], "secretKey": keys["s3_secret_key"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_file = stack.folder / "seaweedfs" / "s3.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.touch(mode=0o600)
    config_file.write_text(json.dumps(config))
    args = [
        _executable("weed"),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",  # without it SeaweedFS listens on every interface
        f"-dir={stack.folder / 'seaweedfs'}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        "-volume.max=0",  # as many volumes as the free disk holds, of at most:
        "-master.volumeSizeLimitMB=512",
        "-filer",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={config_file}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-iam=false",
    ]
    record = _spawn(stack, "seaweedfs", args, dict(os.environ))
    _wait_until(lambda: _bucket_ready(stack), "SeaweedFS", record, stack.folder / "seaweedfs.log")
    return record


def _bucket_ready(stack: Stack) -> bool:
    """The bucket exists (made now if the S3 server answers without it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = stack.s3_client(retries=1)
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if BUCKET not in names:
            client.create_bucket(Bucket=BUCKET)
        return True
    except (BotoCoreError, ClientError):
        return False


def _pg_env(stack: Stack, port: int) -> dict[str, str]:
    """libpq's settings for the stack's database, the password through a ``.pgpass`` file."""
    passfile = stack.folder / "pgpass"
    password = stack.secrets()["postgres_password"]
    passfile.touch(mode=0o600)
    passfile.write_text(f"127.0.0.1:{port}:*:{PG_USER}:{password}\n")
    return {**os.environ, "PGPASSFILE": str(passfile), "PGHOST": "127.0.0.1", "PGPORT": str(port)}


def _as_postgres(path: Path) -> None:
    user = _postgres_user()
    if user:
        shutil.chown(path, user, user)


def _init_postgres(stack: Stack) -> Path:
    data = stack.folder / "postgres"
    if (data / "PG_VERSION").exists():
        return data
    user = _postgres_user()
    if user and subprocess.run(["test", "-x", str(stack.folder)], user=user).returncode != 0:
        raise RanError(
            f"the postgres user cannot reach {stack.folder} (PostgreSQL refuses to run as "
            "root): use a stack folder outside /root, e.g. --dir /var/lib/ran/stack"
        )
    scratch = stack.folder / "postgres.init"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    _as_postgres(scratch)
    pwfile = stack.folder / "postgres.pw"
    pwfile.touch(mode=0o600)
    pwfile.write_text(stack.secrets()["postgres_password"] + "\n")
    _as_postgres(pwfile)
    try:
        done = subprocess.run(
            [
                str(_postgres_bin("initdb")),
                "-D",
                str(scratch),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            user=user,
            cwd=stack.folder,
        )
    finally:
        pwfile.unlink()
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RanError(f"initdb failed: {last}")
    scratch.rename(data)
    return data


def _start_postgres(stack: Stack, ports: dict[str, int]) -> dict[str, Any]:
    data = _init_postgres(stack)
    (data / "postmaster.pid").unlink(missing_ok=True)  # left by a killed server
    args = [
        str(_postgres_bin("postgres")),
        "-D",
        str(data),
        "-p",
        str(ports["postgres"]),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",  # TCP on 127.0.0.1 only
    ]
    log = stack.folder / "postgres.log"
    log.touch()
    _as_postgres(log)
    record = _spawn(stack, "postgres", args, dict(os.environ), user=_postgres_user())
    env = _pg_env(stack, ports["postgres"])
    ready = [str(_postgres_bin("pg_isready")), "-q", "-U", PG_USER, "-d", "postgres"]
    _wait_until(lambda: subprocess.run(ready, env=env).returncode == 0, "PostgreSQL", record, log)
    for database in ("mlflow", "mlflow_auth"):
        exists = subprocess.run(
            [str(_postgres_bin("psql")), "-U", PG_USER, "-d", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not exists:
            subprocess.run(
                [str(_postgres_bin("createdb")), "-U", PG_USER, database], env=env, check=True
            )
    return record


def _start_mlflow(stack: Stack, ports: dict[str, int]) -> dict[str, Any]:
    auth_ini = stack.folder / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql://{PG_USER}@127.0.0.1:{ports['postgres']}/mlflow_auth\n"
        f"admin_username = {MLFLOW_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a password check is a PBKDF2 hash (tens of ms): without the cache, logging a model
        # (one upload per file of its code) spends seconds on it
        "auth_cache_ttl_seconds = 60\n"
    )
    env = {
        **_pg_env(stack, ports["postgres"]),
        **stack.s3_environment(),
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.secrets()["mlflow_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secrets()["flask_secret_key"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for client_side in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME"):
        env.pop(client_side, None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    args = [
        _executable("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports["mlflow"]),
        "--backend-store-uri",
        f"postgresql+psycopg://{PG_USER}@127.0.0.1:{ports['postgres']}/mlflow",
        "--artifacts-destination",
        ARTIFACTS,
        "--serve-artifacts",
        "--app-name",
        "basic-auth",
        "--workers",
        "2",
    ]
    record = _spawn(stack, "mlflow", args, env)
    url = f"http://127.0.0.1:{ports['mlflow']}/health"
    _wait_until(lambda: _http_ok(url), "the MLflow server", record, stack.folder / "mlflow.log")
    return record


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


STARTERS = {"seaweedfs": _start_seaweedfs, "postgres": _start_postgres, "mlflow": _start_mlflow}


def up(folder: Path) -> Stack:
    """Start every service of the stack in ``folder`` that is not running (SeaweedFS, then
    PostgreSQL, then the MLflow server that needs both); nothing when all are up."""
    stack = Stack(folder.resolve())
    stack.folder.mkdir(parents=True, exist_ok=True)
    stack.folder.chmod(0o755)  # the postgres user reaches its data through it
    stack.secrets()
    state = stack.state()
    if not state["ports"]:
        names = ("s3", "master", "volume", "filer", "postgres", "mlflow")
        state["ports"] = dict(zip(names, _free_ports(len(names), set()), strict=True))
        stack.save_state(state)
    for service in SERVICES:
        if not _alive(state["pids"].get(service)):
            state["pids"][service] = STARTERS[service](stack, state["ports"])
            stack.save_state(state)
    return stack


def stop_service(stack: Stack, service: str) -> None:
    """Stop one service: PostgreSQL with its fast shutdown (SIGINT); SeaweedFS gets a few
    seconds (once its peers are gone its shutdown keeps retrying them: then SIGKILL, which
    its append-only volumes and journalled metadata store survive)."""
    state = stack.state()
    record = state["pids"].get(service)
    if service == "postgres":
        _stop(record, signal.SIGINT)
    else:
        _stop(
            record, signal.SIGTERM, SEAWEEDFS_STOP_S if service == "seaweedfs" else STOP_TIMEOUT_S
        )
    state["pids"].pop(service, None)
    stack.save_state(state)


def down(stack: Stack) -> list[str]:
    """Stop the services ``up`` started, the MLflow server first; returns those stopped."""
    stopped = [s for s in reversed(SERVICES) if _alive(stack.state()["pids"].get(s))]
    for service in reversed(SERVICES):
        stop_service(stack, service)
    return stopped


def status(stack: Stack) -> dict[str, dict[str, Any]]:
    """Per service: its pid, whether that process runs, and whether its port answers."""
    state = stack.state()
    ports = {"seaweedfs": "s3", "postgres": "postgres", "mlflow": "mlflow"}
    report = {}
    for service in SERVICES:
        record = state["pids"].get(service)
        port = state["ports"].get(ports[service])
        running = _alive(record)
        report[service] = {
            "pid": record["pid"] if record else None,
            "port": port,
            "running": running,
            "answers": bool(running and port and _answers(port)),
        }
    return report


def add_dvc_remote(stack: Stack, repo: Path) -> None:
    """Make the stack's bucket the default DVC remote of ``repo``, in ``.dvc/config.local``
    (never committed: it holds the bucket's keys)."""
    keys = stack.secrets()
    settings = [
        ["remote", "add", "--local", "--force", "--default", DVC_REMOTE, DVC_REMOTE_URL],
        ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", stack.s3_endpoint()],
        ["remote", "modify", "--local", DVC_REMOTE, "access_key_id", keys["s3_access_key"]],
        ["remote", "modify", "--local", DVC_REMOTE, "secret_access_key", keys["s3_secret_key"]],
    ]
    dvc = _executable("dvc")
    for args in settings:
        done = subprocess.run([dvc, *args], cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            raise RanError(f"dvc {' '.join(args[:3])} failed in {repo}: {done.stderr.strip()}")
