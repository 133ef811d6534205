"""A fleet on loopback for scale-out tests: the services' settings, and worker processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import SERVICES, TOKEN
from tests.servers import ROOT

REDIS_URL = SERVICES.get("OPENEDITS_TEST_REDIS_URL")
S3_ENDPOINT = SERVICES.get("OPENEDITS_TEST_S3_ENDPOINT")
S3_BUCKET = SERVICES.get("OPENEDITS_TEST_S3_BUCKET", "")
SERVICES_DIR = SERVICES.get("OPENEDITS_TEST_SERVICES_DIR")

needs_services = pytest.mark.skipif(
    not (REDIS_URL and S3_ENDPOINT and SERVICES.get("OPENEDITS_TEST_POSTGRES_URL")),
    reason="Redis, PostgreSQL and SeaweedFS are not running (scripts/test starts them)",
)
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="Redis is not running (scripts/test)")
needs_s3 = pytest.mark.skipif(not S3_ENDPOINT, reason="SeaweedFS is not running (scripts/test)")


def aws_env() -> dict[str, str]:
    """boto3's standard settings, pointing at the test S3 server."""
    return {
        "AWS_ENDPOINT_URL": S3_ENDPOINT or "",
        "AWS_ACCESS_KEY_ID": SERVICES.get("OPENEDITS_TEST_S3_KEY", ""),
        "AWS_SECRET_ACCESS_KEY": SERVICES.get("OPENEDITS_TEST_S3_SECRET", ""),
        "AWS_REGION": "us-east-1",
    }


def s3_client():  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    env = aws_env()
    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


def fleet_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    """Settings every process of one fleet shares (a fresh blob prefix per fleet)."""
    assert REDIS_URL
    return {
        "OPENEDITS_BROKER_URL": REDIS_URL,
        "OPENEDITS_DATABASE_URL": database_url,
        "OPENEDITS_BLOBS_URL": f"s3://{S3_BUCKET}/fleet-{secrets.token_hex(4)}",
        "OPENEDITS_DATA_DIR": str(data_dir),
        "OPENEDITS_API_TOKENS": TOKEN,
        "OPENEDITS_ALLOW_PRIVATE_URLS": "true",
        "OPENEDITS_LEASE_SECONDS": "3",
        "OPENEDITS_REAPER_INTERVAL_SECONDS": "0.5",
        "OPENEDITS_VISIBILITY_TIMEOUT_SECONDS": "600",
        "OPENEDITS_WEBHOOK_RETRY_DELAYS": "0.5s,1s,2s,4s,8s",
        "OPENEDITS_WEBHOOK_POLL_SECONDS": "0.2",
        "OPENEDITS_RATE_LIMIT": "off",
        "OPENEDITS_LOG_LEVEL": "WARNING",
        **aws_env(),
        **extra,
    }


class WorkerProcess:
    """A `tests._worker` process (Celery prefork on a FakeEngine) in a process group of its
    own, so a kill takes its children too, as a machine dying would."""

    def __init__(self, env: dict[str, str], step_seconds: float, devices: str,
                 drain_seconds: float = 30.0) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._worker", str(step_seconds), devices,
             str(drain_seconds)],
            cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=self.log,
            start_new_session=True,
        )

    def owns(self, pid: int) -> bool:
        """Whether `pid` is this worker or one of its pool processes."""
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


def restart_redis_empty() -> None:
    """Kill the test Redis without saving and start it again with nothing in it."""
    assert SERVICES_DIR
    subprocess.run([sys.executable, str(ROOT / "scripts" / "services.py"), "restart-redis",
                    SERVICES_DIR], check=True, timeout=30)


def flush_redis() -> None:
    import redis

    assert REDIS_URL
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
