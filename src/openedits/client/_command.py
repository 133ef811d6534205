"""`openedits edit`: edit one image from the shell through the SDK, with a progress bar.

`register(app)` adds the command to the main typer app (`openedits.cli`). Results go to stdout
(the saved paths, one per line, so scripts can use them); progress and errors go to stderr, and
every error is one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ._client import Client
from ._exceptions import (
    APIConnectionError,
    AuthenticationError,
    OpenEditsClientError,
    TaskFailedError,
    WaitTimeoutError,
)
from ._models import EditResult, TaskRecord
from ._wire import DEFAULT_BASE_URL

__all__ = ["edit", "register"]


class Mode(StrEnum):
    """The speed tiers of the contract's `mode`."""

    turbo = "turbo"
    fast = "fast"
    relax = "relax"


def register(app: typer.Typer) -> None:
    """Add the `edit` command to `app`."""
    app.command("edit", no_args_is_help=True)(edit)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _explain(exc: BaseException, server: str) -> str:
    # One line that says what went wrong and, where we can tell, what to do about it.
    if isinstance(exc, AuthenticationError):
        return f"{exc} (pass --token or set OPENEDITS_TOKEN)"
    if isinstance(exc, APIConnectionError):
        return (
            f"cannot reach the server at {server}: {exc.__cause__ or exc} "
            "(is `openedits serve` running? pass --server or set OPENEDITS_SERVER)"
        )
    if isinstance(exc, WaitTimeoutError):
        return f"{exc}; fetch it later with the SDK's Client.wait({exc.task_id!r})"
    if isinstance(exc, OpenEditsClientError | FileNotFoundError | ValueError | TypeError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def edit(
    image: Annotated[
        str, typer.Argument(help="The image to edit: a local file or an http(s) URL.")
    ],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="What the edited region should show.")
    ],
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            "-m",
            help="Mask file or URL: white = regenerate, black = keep. Without one the whole "
            "image may change (the opencv engine needs one).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for grid.png and the variants (default: openedits-out/<task id>).",
            file_okay=False,
        ),
    ] = None,
    split: Annotated[
        bool, typer.Option("--split", help="Also fetch the four variants as separate files.")
    ] = False,
    mode: Annotated[
        Mode | None, typer.Option("--mode", help="Speed tier (the server's default is fast).")
    ] = None,
    # The library reads no environment (only openedits.settings does); these two options are
    # the command line's, and click resolves their `envvar` before any openedits code runs.
    server: Annotated[
        str, typer.Option("--server", envvar="OPENEDITS_SERVER", help="Base URL of the API.")
    ] = DEFAULT_BASE_URL,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="OPENEDITS_TOKEN", help="API token.", show_default=False),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for the edit.")
    ] = 600.0,
) -> None:
    """Edit IMAGE as --prompt says, follow the task, and save the results."""
    console = Console(stderr=True)
    task_id: str | None = None
    try:
        with Client(base_url=server, token=token) as client:
            started = time.monotonic()
            task_id = client.submit(
                image,
                prompt,
                mask=mask,
                split_images=split,
                mode=mode.value if mode else None,
            )
            result = _follow(client, task_id, timeout, console)
            target = out if out is not None else Path("openedits-out") / task_id
            paths = result.save(target)
        console.print(
            f"task {task_id} done in {time.monotonic() - started:.1f}s: "
            f"{len(paths)} file(s) in {target}",
            highlight=False,
            soft_wrap=True,  # a long path stays one line, as scripts and tests expect
        )
        for path in paths:
            typer.echo(str(path))
    except KeyboardInterrupt:
        where = f"; task {task_id} goes on on the server" if task_id else ""
        _fail(f"interrupted{where}", code=130)
    except TaskFailedError as exc:
        _fail(str(exc))
    except Exception as exc:  # every failure becomes one line, by design of this command
        _fail(_explain(exc, server))


def _follow(client: Client, task_id: str, timeout: float, console: Console) -> EditResult:
    """Wait for the task with a progress bar on stderr."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,  # the bar gives way to the one line that says how it ended
    ) as progress:
        bar: TaskID = progress.add_task("pending", total=100)

        def on_progress(record: TaskRecord) -> None:
            progress.update(bar, completed=record.progress, description=record.status)

        result = client.wait(task_id, timeout=timeout, on_progress=on_progress)
        progress.update(bar, completed=100, description="succeeded")
        return result
