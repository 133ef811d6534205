"""The `openedits` command: tokens, migrate, and the first-run token of serve."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from openedits.cli import app
from openedits.settings import Settings
from openedits.store.database import create_db_engine
from openedits.store.tokens import TokenStore

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPENEDITS_DATA_DIR", str(tmp_path))
    return tmp_path


def test_tokens_create_list_revoke(env: Path) -> None:
    created = runner.invoke(app, ["tokens", "create", "--name", "ci", "--scope", "edits"])
    assert created.exit_code == 0, created.output
    token_id, scopes, secret = created.output.strip().split("\t")
    assert scopes == "edits" and secret.startswith("oe_")
    store = TokenStore(create_db_engine(Settings(data_dir=env).resolved_database_url))
    assert store.lookup(secret).id == token_id
    listed = runner.invoke(app, ["tokens", "list"])
    assert f"{token_id}\tci\tedits\tactive" in listed.output
    assert secret not in listed.output
    assert runner.invoke(app, ["tokens", "revoke", token_id]).exit_code == 0
    assert store.lookup(secret) is None
    again = runner.invoke(app, ["tokens", "revoke", token_id])
    assert again.exit_code == 1


def test_tokens_create_refuses_unknown_scopes(env: Path) -> None:
    result = runner.invoke(app, ["tokens", "create", "--scope", "root"])
    assert result.exit_code == 2
    assert "root" in result.output and "edits" in result.output


def test_migrate(env: Path) -> None:
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 0 and "schema up to date" in result.output
    assert (env / "openedits.db").exists()


def test_bad_configuration_is_one_line(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENEDITS_ENGINE", "upstream")
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 2
    assert "OPENEDITS_UPSTREAM_URL" in result.output


def test_a_broker_with_a_local_store_is_refused_naming_what_to_set(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENEDITS_BROKER_URL", "redis://127.0.0.1:6379/0")
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 2
    assert "SQLite" in result.output and "OPENEDITS_DATABASE_URL=postgresql" in result.output


def test_worker_without_a_broker_says_what_to_set(env: Path) -> None:
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "OPENEDITS_BROKER_URL" in result.output


def test_worker_memory_sizes_parse_to_kilobytes() -> None:
    from openedits.cli import parse_memory

    assert parse_memory("8GB") == 8 * 1024 * 1024
    assert parse_memory("512mb") == 512 * 1024
    assert parse_memory("900000") == 900000
    with pytest.raises(Exception, match="not a size"):
        parse_memory("lots")


