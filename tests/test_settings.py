"""Settings: the scale-out combinations that cannot work across machines are refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openedits.settings import Settings

PG = "postgresql+psycopg://u@db:5432/openedits"
REDIS = "redis://broker:6379/0"


def test_a_broker_with_sqlite_is_refused_naming_postgresql() -> None:
    with pytest.raises(ValidationError, match="OPENEDITS_DATABASE_URL=postgresql"):
        Settings(broker_url=REDIS, blobs_url="s3://b/p")


def test_a_broker_with_a_local_results_folder_is_refused_naming_s3() -> None:
    with pytest.raises(ValidationError, match="OPENEDITS_BLOBS_URL=s3://"):
        Settings(broker_url=REDIS, database_url=PG)


def test_a_broker_that_is_not_redis_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a Redis URL"):
        Settings(broker_url="amqp://rabbit//", database_url=PG, blobs_url="s3://b/p")


def test_a_visibility_timeout_under_the_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(broker_url=REDIS, database_url=PG, blobs_url="s3://b/p", lease_seconds=300,
                 visibility_timeout_seconds=300)


def test_scale_out_shares_rate_limits_through_the_broker_unless_told_otherwise() -> None:
    s = Settings(broker_url=REDIS, database_url=PG, blobs_url="s3://b/p")
    assert s.scale_out and s.rate_limit_storage_url == REDIS
    own = Settings(broker_url=REDIS, database_url=PG, blobs_url="file:///mnt/shared",
                   rate_limit_storage_url="redis://limits:6379/1")
    assert own.rate_limit_storage_url == "redis://limits:6379/1"


def test_the_embedded_default_stays_local() -> None:
    s = Settings()
    assert not s.scale_out
    assert s.rate_limit_storage_url == "memory://" and s.blobs_url is None
    assert s.resolved_database_url.startswith("sqlite:///")


def test_devices_are_a_comma_separated_list() -> None:
    assert Settings(device="cuda:0, cuda:1").devices == ["cuda:0", "cuda:1"]
    assert Settings(device="cpu,cpu").devices == ["cpu", "cpu"]
    assert Settings().devices == ["auto"]
