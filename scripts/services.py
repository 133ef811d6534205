"""Start and stop throwaway Redis, PostgreSQL and SeaweedFS (S3) servers for tests and benches.

    python scripts/services.py start DIR          # prints `export NAME=value` lines
    python scripts/services.py stop DIR           # stops each by the PID it recorded
    python scripts/services.py restart-redis DIR  # Redis loses everything and comes back

Everything binds 127.0.0.1 on free ports and keeps its data under DIR. A service whose program is
missing is skipped (its variables are not exported), so the tests that need it skip. Recipes:
SERVICES.md in the shared docs. Standard library only: it runs before the venv is trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
S3_KEY, S3_SECRET = "openedits-test", "openedits-test-secret"
S3_BUCKET = "openedits-test"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    if os.geteuid() == 0:
        return ["su", "postgres", "-c", " ".join(f"'{a}'" for a in argv)]
    return argv


def start_redis(root: Path, port: int | None = None) -> dict[str, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        return {}
    port = port or free_ports(1)[0]
    d = root / "redis"
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [exe, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(d), "--pidfile", str(d / "redis.pid"),
         "--logfile", str(d / "redis.log")],
        check=True,
    )
    if not _wait_port(port, 10):
        raise RuntimeError(f"redis did not answer on {port}: see {d / 'redis.log'}")
    (d / "port").write_text(str(port))
    return {"OPENEDITS_TEST_REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def stop_redis(root: Path) -> None:
    _kill_pidfile(root / "redis" / "redis.pid")


def restart_redis(root: Path) -> None:
    """Kill Redis without saving, and start it again empty on the same port."""
    port = int((root / "redis" / "port").read_text())
    pidfile = root / "redis" / "redis.pid"
    _kill_pidfile(pidfile, sig=signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _wait_port(port, 0.05) and time.monotonic() < deadline:
        time.sleep(0.05)
    start_redis(root, port)


def start_postgres(root: Path) -> dict[str, str]:
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        found = shutil.which("initdb")
        if found is None:
            return {}
        initdb = Path(found)
    bindir = initdb.parent
    port = free_ports(1)[0]
    d = root / "pg"
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
    subprocess.run(_as_postgres([str(initdb), "-D", str(d / "data"), "-U", "postgres", "-A",
                                 "trust", "--no-sync"]), check=True, stdout=subprocess.DEVNULL)
    opts = f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(d / "data"), "-l",
                                 str(d / "pg.log"), "-w", "-o", opts, "start"]),
                   check=True, stdout=subprocess.DEVNULL)
    (d / "bindir").write_text(str(bindir))
    return {"OPENEDITS_TEST_POSTGRES_URL": f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"}


def stop_postgres(root: Path) -> None:
    d = root / "pg"
    if not (d / "bindir").exists():
        return
    bindir = Path((d / "bindir").read_text())
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "fast",
                                 "stop"]), check=False, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def start_s3(root: Path) -> dict[str, str]:
    exe = _weed()
    if exe is None:
        return {}
    d = root / "s3"
    d.mkdir(parents=True, exist_ok=True)
    p = free_ports(6)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    log = (d / "weed.log").open("wb")
    proc = subprocess.Popen(
        [exe, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
         f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}",
         f"-s3.port={p[3]}", f"-s3.port.iceberg={p[4]}"],
        cwd=d, env=env, stdout=log, stderr=log, start_new_session=True,
    )
    (d / "weed.pid").write_text(str(proc.pid))
    endpoint = f"http://127.0.0.1:{p[3]}"
    _wait_s3(endpoint, proc)
    return {"OPENEDITS_TEST_S3_ENDPOINT": endpoint, "OPENEDITS_TEST_S3_KEY": S3_KEY,
            "OPENEDITS_TEST_S3_SECRET": S3_SECRET, "OPENEDITS_TEST_S3_BUCKET": S3_BUCKET}


def _wait_s3(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait for a successful bucket creation and put, not just an open port."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        _wait_port(int(endpoint.rsplit(":", 1)[1]), timeout)
        return
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited {proc.returncode}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=S3_BUCKET)
            client.put_object(Bucket=S3_BUCKET, Key="ready", Body=b"ok")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 did not accept a put: {last}")


def stop_s3(root: Path) -> None:
    _kill_pidfile(root / "s3" / "weed.pid", group=True)


def _kill_pidfile(path: Path, *, sig: int = signal.SIGTERM, group: bool = False) -> None:
    if not path.exists():
        return
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        return
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def start(root: Path) -> dict[str, str]:
    """Start all three; returns the variables that describe them."""
    root.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {"OPENEDITS_TEST_SERVICES_DIR": str(root)}
    for starter in (start_redis, start_postgres, start_s3):
        try:
            env.update(starter(root))
        except Exception as exc:
            print(f"services: {starter.__name__} failed: {exc}", file=sys.stderr)
    (root / "env.json").write_text(json.dumps(env))
    return env


def stop(root: Path) -> None:
    """Stop whatever `start` started under `root`."""
    for stopper in (stop_s3, stop_redis, stop_postgres):
        try:
            stopper(root)
        except Exception as exc:
            print(f"services: {stopper.__name__} failed: {exc}", file=sys.stderr)


def main() -> None:
    command, root = sys.argv[1], Path(sys.argv[2]).resolve()
    if command == "start":
        for key, value in start(root).items():
            print(f"export {key}={value}")
    elif command == "stop":
        stop(root)
    elif command == "restart-redis":
        restart_redis(root)
    else:
        raise SystemExit(f"unknown command {command!r}: start, stop or restart-redis")


if __name__ == "__main__":
    main()
