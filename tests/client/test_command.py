"""`openedits edit` against a served instance: files saved, paths printed, errors one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from openedits.client._command import register
from tests.client.client_support import (
    TOKEN,
    LiveServer,
    mask_bytes,
    png_bytes,
    size_of,
)
from tests.servers import free_port


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, as in openedits.cli, so `edit` stays a subcommand."""

    register(app)
    return app


APP = make_app()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    # Neither variable may leak in from the developer's shell.
    clean: dict[str, str | None] = {"OPENEDITS_SERVER": None, "OPENEDITS_TOKEN": None}
    return CliRunner().invoke(APP, list(args), env={**clean, **(env or {})})


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_edit_saves_grid_and_variants_and_prints_their_paths(
    live_server: LiveServer, image_file: Path, mask_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run(
        "edit", str(image_file), "--prompt", "remove the dot", "--mask", str(mask_file),
        "--out", str(out), "--split", "--mode", "turbo",
        "--server", live_server.url, "--token", TOKEN,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == ["grid.png", "0_0.png", "0_1.png", "0_2.png", "0_3.png"]
    assert all(p.parent == out and p.is_file() for p in paths)
    assert size_of(paths[0]) == (128, 96) and size_of(paths[1]) == (64, 48)
    [summary] = result.stderr.strip().splitlines()  # the bar is gone; one line says how it ended
    assert summary.startswith("task ") and " done in " in summary
    assert summary.endswith(f": 5 file(s) in {out}")


def test_server_and_token_come_from_the_environment(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes())
    (tmp_path / "m.png").write_bytes(mask_bytes())
    monkeypatch.chdir(tmp_path)
    env = {"OPENEDITS_SERVER": live_server.url, "OPENEDITS_TOKEN": TOKEN}
    result = run("edit", "in.png", "-p", "x", "-m", "m.png", env=env)
    assert result.exit_code == 0, result.output
    [grid] = [Path(line) for line in result.stdout.splitlines()]  # no --split: the grid only
    assert grid.parts[0] == "openedits-out" and grid.name == "grid.png"
    assert (tmp_path / grid).is_file()


def test_a_wrong_token_is_one_line_that_says_what_to_set(
    live_server: LiveServer, image_file: Path
) -> None:
    result = run("edit", str(image_file), "-p", "x", "--server", live_server.url, "--token", "no")
    assert_one_line_error(result, "401 invalid_token", "OPENEDITS_TOKEN")


def test_server_refusals_and_task_failures_are_one_line(
    live_server: LiveServer, image_file: Path, tmp_path: Path
) -> None:
    common = ("--server", live_server.url, "--token", TOKEN)
    # No mask: the opencv engine refuses at submit.
    assert_one_line_error(run("edit", str(image_file), "-p", "x", *common), "bad_request", "mask")
    # Bytes that claim to be a PNG but are not: the task fails in the worker.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    mask = tmp_path / "m.png"
    mask.write_bytes(mask_bytes())
    result = run("edit", str(broken), "-p", "x", "-m", str(mask), *common)
    assert_one_line_error(result, "failed (bad_request)")


def test_local_problems_are_one_line_before_any_request(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens: any request would fail
    assert_one_line_error(
        run("edit", str(tmp_path / "missing.png"), "-p", "x", "--server", server),
        "missing.png", "neither an existing file",
    )  # fmt: skip
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert_one_line_error(run("edit", str(text), "-p", "x", "--server", server), "not a PNG, JPEG")


def test_an_unreachable_server_is_one_line_with_a_hint(image_file: Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    result = run("edit", str(image_file), "-p", "x", "--server", server, "--token", TOKEN)
    assert_one_line_error(result, f"cannot reach the server at {server}", "OPENEDITS_SERVER")


def test_usage_errors_are_clicks() -> None:
    result = run("edit", "x.png")
    assert result.exit_code == 2 and "--prompt" in result.stderr
    result = run("edit", "x.png", "-p", "x", "--mode", "warp")
    assert result.exit_code == 2 and "warp" in result.stderr
