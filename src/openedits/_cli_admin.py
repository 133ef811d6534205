"""The operator's `openedits tasks …` and `openedits webhooks …` commands, on the store itself."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from openedits.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from openedits.store.tasks import TaskRow, TaskStore
    from openedits.webhooks.outbox import Delivery, Outbox

__all__ = ["register"]

tasks_app = typer.Typer(
    no_args_is_help=True,
    help="List, show and cancel tasks (every owner's), as an admin token sees them.",
)
webhooks_app = typer.Typer(
    no_args_is_help=True,
    help="List, show and re-send callback deliveries (the admin endpoints' view).",
)

# Set by `register`: the command's own Settings loader, which turns a bad configuration into a
# one-line message and exit code 2 for every command alike.
_load_settings: Callable[[], Settings] = Settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
OffsetOption = Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")]


def register(app: typer.Typer, settings: Callable[[], Settings] = Settings) -> None:
    """Add the `tasks` and `webhooks` command groups to the `openedits` command."""
    global _load_settings
    _load_settings = settings
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(webhooks_app, name="webhooks")


class TaskStateChoice(StrEnum):
    """`tasks list --state`."""

    all = "all"
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class DeliveryStateChoice(StrEnum):
    """`webhooks list --state`, as GET /admin/webhooks/deliveries takes it."""

    failed = "failed"
    pending = "pending"
    delivered = "delivered"
    all = "all"


@dataclass
class _Stores:
    tasks: TaskStore
    outbox: Outbox


@contextmanager
def _stores() -> Iterator[_Stores]:
    """The configured database's task store and outbox (schema brought up to date first, as
    every command that opens the store does)."""
    from openedits.store.database import create_db_engine, migrate
    from openedits.store.tasks import TaskStore
    from openedits.webhooks.outbox import Outbox

    settings = _load_settings()
    engine = create_db_engine(settings.resolved_database_url)
    try:
        migrate(engine)
        yield _Stores(TaskStore(engine, inputs_dir=settings.inputs_dir), Outbox(engine))
    finally:
        engine.dispose()


def _console() -> Console:
    from rich.console import Console

    # On a terminal rich fits tables to its width; piped output (a file, grep, a test) is not
    # squeezed into the 80 columns rich would assume, so every row stays whole on one line.
    return Console(highlight=False, width=None if _is_terminal() else 1000)


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"openedits: {message}", err=True)
    return typer.Exit(code)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _short(text: str | None, limit: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_IDS = ("id", "task", "webhook-id")


def _table(*columns: str, title: str | None = None) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False)
    for name in columns:
        # One line per row; ids are kept whole (they are what the next command is given),
        # other text gives way with an ellipsis when the screen is narrow.
        table.add_column(name, no_wrap=True, overflow="ellipsis",
                         min_width=36 if name in _IDS else None)
    return table


def _fields(title: str, rows: list[tuple[str, str]]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    return table


def _footer(shown: int, offset: int, total: int, what: str) -> str:
    if shown == 0:
        return f"no {what} (of {total})" if total else f"no {what}"
    return f"{offset + 1}-{offset + shown} of {total} {what}, newest first"


# --- tasks


def _task_json(row: TaskRow) -> dict[str, Any]:
    """The task record the API shows an admin, plus what only the operator sees."""
    from openedits.records import task_record

    return {
        **task_record(row),
        "owner": row.owner,
        "attempts": row.attempts,
        "callback_url": row.callback_url,
        "timings": row.timings,
        "notes": row.notes,
    }


def _task_error(row: TaskRow) -> str:
    response = row.response or {}
    error = response.get("error") if not response.get("success") else None
    if isinstance(error, dict):
        return f"{error.get('code', '?')}: {error.get('message', '')}"
    return ""


@tasks_app.command("list")
def tasks_list(
    state: Annotated[TaskStateChoice, typer.Option(help="Only tasks in this state.")] = (
        TaskStateChoice.all
    ),
    owner: Annotated[str | None, typer.Option(help="Only this token's (tok_… id).")] = None,
    offset: OffsetOption = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Tasks, newest first: every owner's, as an admin token's retrieve_batch sees them."""
    from openedits.schemas import TaskState

    states = None if state is TaskStateChoice.all else [TaskState(state.value)]
    with _stores() as stores:
        rows, total = stores.tasks.page(owner=owner, states=states, offset=offset, limit=limit)
    if as_json:
        _print_json({"count": total, "items": [_task_json(r) for r in rows]})
        return
    table = _table("id", "state", "progress", "owner", "created", "elapsed", "prompt", "error")
    for row in rows:
        elapsed = (
            f"{row.finished_at - row.started_at:.2f} s"
            if row.finished_at is not None and row.started_at is not None
            else "-"
        )
        prompt = _short(str(row.request.get("prompt", "")), 30)
        table.add_row(row.id, row.state.value, f"{row.progress}%", row.owner,
                      _when(row.created_at), elapsed, prompt, _short(_task_error(row), 40))
    console = _console()
    if rows:
        console.print(table)
    console.print(_footer(len(rows), offset, total, "tasks"))


def _get_task(stores: _Stores, task_id: str) -> TaskRow:
    row = stores.tasks.get(task_id)
    if row is None:
        raise _fail(f"no task {task_id!r}; list them with `openedits tasks list`")
    return row


@tasks_app.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    as_json: JsonOption = False,
) -> None:
    """One task: its record, timings, notes and the callback deliveries it owes."""
    with _stores() as stores:
        row = _get_task(stores, task_id)
        deliveries = stores.outbox.for_task(task_id)
        history = stores.outbox.history([d.id for d in deliveries])
    if as_json:
        _print_json({**_task_json(row),
                     "deliveries": [d.to_json(history[d.id]) for d in deliveries]})
        return
    response = row.response or {}
    fields = [
        ("id", row.id),
        ("state", row.state.value),
        ("progress", f"{row.progress}%"),
        ("owner", row.owner),
        ("trace id", row.trace_id),
        ("created", _when(row.created_at)),
        ("started", _when(row.started_at)),
        ("finished", _when(row.finished_at)),
        ("attempts", str(row.attempts)),
        ("prompt", str(row.request.get("prompt", "")) or "-"),
        ("callback url", row.callback_url or "-"),
    ]
    if response.get("success"):
        fields.append(("image url", str(response.get("image_url"))))
    elif error := _task_error(row):
        fields.append(("error", error))
    if row.timings:
        fields.append(("timings", ", ".join(f"{k} {v:.3f} s" for k, v in row.timings.items())))
    if row.notes:
        fields.append(("notes", "; ".join(row.notes)))
    if row.cancel_requested and not row.state.is_terminal():
        fields.append(("cancel", "requested: it stops at its next step"))
    console = _console()
    console.print(_fields(f"task {row.id}", fields))
    if deliveries:
        console.print()
        console.print(_deliveries_table(deliveries, title="callback deliveries"))


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    as_json: JsonOption = False,
) -> None:
    """Stop a task, as the API's cancel does: a queued one at once, a running one at its next
    engine step (wherever it runs); one that already ended is left as it is."""
    from openedits.errors import TaskCancelled
    from openedits.records import failure_body
    from openedits.schemas import TaskState

    with _stores() as stores:
        row = _get_task(stores, task_id)
        if row.state is TaskState.pending:
            error = TaskCancelled("the task was cancelled by an operator before it started")
            body = failure_body(row.id, row.trace_id, error)
            if not stores.tasks.finish(row.id, TaskState.cancelled, body,
                                       error_status=error.status_code):
                # A worker claimed it between our read and our write: stop it there.
                stores.tasks.request_cancel(row.id)
        elif row.state is TaskState.running:
            stores.tasks.request_cancel(row.id)
        after = stores.tasks.get(row.id) or row
    if as_json:
        _print_json(_task_json(after))
    elif after.state is TaskState.cancelled and row.state is TaskState.pending:
        typer.echo(f"cancelled {after.id} (it had not started)")
    elif after.state is TaskState.running:
        typer.echo(f"asked {after.id} to stop: it is running and ends cancelled at its next step")
    else:
        typer.echo(f"{after.id} had already ended ({after.state.value}); nothing changed")


# --- webhooks


def _deliveries_table(deliveries: list[Delivery], *, title: str | None = None) -> Table:
    table = _table("webhook-id", "task", "state", "attempts", "last status", "last attempt",
                   "last error", "url", title=title)
    for d in deliveries:
        table.add_row(d.id, d.task_id, d.state.value, str(d.attempts),
                      str(d.last_status) if d.last_status is not None else "-",
                      _when(d.last_attempt_at), _short(d.last_error, 40), _short(d.url, 40))
    return table


def _get_delivery(stores: _Stores, delivery_id: str) -> dict[str, Any]:
    delivery = stores.outbox.get(delivery_id)
    if delivery is None:
        raise _fail(f"no webhook delivery {delivery_id!r}; list them with "
                    "`openedits webhooks list --state all`")
    return delivery.to_json(stores.outbox.history([delivery.id])[delivery.id])


def _print_delivery(shown: dict[str, Any]) -> None:
    fields = [
        ("webhook-id", shown["id"]),
        ("task", shown["task_id"]),
        ("url", shown["url"]),
        ("state", shown["state"]),
        ("attempts", str(shown["attempt_count"])),
        ("created", _when(shown["created_at"])),
        ("next attempt", _when(shown["next_attempt_at"])),
        ("last attempt", _when(shown["last_attempt_at"])),
        ("delivered", _when(shown["delivered_at"])),
        ("last status", str(shown["last_status"]) if shown["last_status"] is not None else "-"),
        ("last error", shown["last_error"] or "-"),
    ]
    console = _console()
    console.print(_fields(f"delivery {shown['id']}", fields))
    if shown["attempts"]:
        table = _table("#", "node", "started", "duration", "status", "outcome", "error",
                       title="attempts")
        for a in shown["attempts"]:
            duration = f"{a['duration_ms']:.1f} ms" if a["duration_ms"] is not None else "-"
            status = str(a["status"]) if a["status"] is not None else "-"
            table.add_row(str(a["number"]), a["node"], _when(a["started_at"]), duration, status,
                          a["outcome"], _short(a["error"], 60))
        console.print()
        console.print(table)


@webhooks_app.command("list")
def webhooks_list(
    state: Annotated[DeliveryStateChoice, typer.Option(help="Only deliveries in this state.")] = (
        DeliveryStateChoice.failed
    ),
    task_id: Annotated[str | None, typer.Option(help="Only this task's.")] = None,
    offset: OffsetOption = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Callback deliveries, newest first (failed ones unless --state says otherwise), as
    GET /admin/webhooks/deliveries lists them."""
    from openedits.webhooks.outbox import DeliveryState

    wanted = None if state is DeliveryStateChoice.all else DeliveryState(state.value)
    with _stores() as stores:
        rows, total = stores.outbox.page(state=wanted, task_id=task_id, offset=offset,
                                         limit=limit)
        history = stores.outbox.history([d.id for d in rows]) if as_json else {}
    if as_json:
        _print_json({"count": total, "items": [d.to_json(history[d.id]) for d in rows]})
        return
    console = _console()
    if rows:
        console.print(_deliveries_table(rows))
    what = "deliveries" if wanted is None else f"{wanted.value} deliveries"
    console.print(_footer(len(rows), offset, total, what))


@webhooks_app.command("show")
def webhooks_show(
    delivery_id: Annotated[str, typer.Argument(help="The msg_… webhook-id.")],
    as_json: JsonOption = False,
) -> None:
    """One delivery with every attempt, as GET /admin/webhooks/deliveries/{id} shows it."""
    with _stores() as stores:
        shown = _get_delivery(stores, delivery_id)
    if as_json:
        _print_json(shown)
    else:
        _print_delivery(shown)


@webhooks_app.command("resend")
def webhooks_resend(
    delivery_id: Annotated[str, typer.Argument(help="The msg_… webhook-id.")],
    as_json: JsonOption = False,
) -> None:
    """Queue a delivery again, due now, with a fresh retry schedule and the same webhook-id
    (POST /admin/webhooks/deliveries/{id}/resend). A running server sends it at its next
    look at the outbox (OPENEDITS_WEBHOOK_POLL_SECONDS)."""
    with _stores() as stores:
        delivery = stores.outbox.resend(delivery_id)
        shown = _get_delivery(stores, delivery_id)  # exits when there is no such delivery
    if as_json:
        _print_json(shown)
    elif delivery is not None and delivery.lease_owner is None:
        typer.echo(f"queued {shown['id']} again: pending, due now "
                   f"(attempt {shown['attempt_count'] + 1} comes next)")
    else:
        typer.echo(f"{shown['id']} is being sent right now; left as it is")
