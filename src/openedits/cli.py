"""The `openedits` command: serve, worker, tokens, migrate, and (from the client package) edit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from openedits import _cli_admin
from openedits.settings import Settings

if TYPE_CHECKING:
    from openedits.store.tokens import TokenStore

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
tokens_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API tokens.")
app.add_typer(tokens_app, name="tokens")


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:
        typer.echo(f"openedits: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


_cli_admin.register(app, _settings)  # `openedits tasks …` and `openedits webhooks …`


def _configure_logging(settings: Settings) -> None:
    from openedits._logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
) -> None:
    """Run the API server (with in-process workers unless a broker is configured).

    SIGTERM or SIGINT drains it: readiness fails, running tasks get OPENEDITS_DRAIN_SECONDS to
    finish, the rest go back to pending, waiting callers are answered, and it exits 0."""
    from openedits._memory import tune_malloc

    # First, before any thread exists: freed image buffers must go back to the system.
    tune_malloc()
    settings = _settings()
    if host:
        # The bind host is one of the Host values trusted by default (OPENEDITS_ALLOWED_HOSTS).
        settings = settings.model_copy(update={"host": host})
    _configure_logging(settings)
    from openedits.api.app import create_app
    from openedits.api.server import run_server

    if not settings.bootstrap_tokens:
        store = _token_store()
        if not store.list():
            # First start with no token configured: without one every call is a 401, so make
            # one and show it once, as the README promises.
            secret, info = store.create("first-run", ["admin"])
            typer.echo(
                f"openedits: no API token was configured; created admin token {info.id}:\n\n"
                f"    {secret}\n\nKeep it: it is shown only now "
                "(more with `openedits tokens create`).",
                err=True,
            )

    run_server(create_app(settings), settings, host=host or settings.host,
               port=port or settings.port)


def parse_memory(text: str) -> int:
    """Kilobytes in a size such as `8GB`, `512MB`, `900000KB` or a bare number of kilobytes."""
    units = {"kb": 1, "k": 1, "mb": 1024, "m": 1024, "gb": 1024**2, "g": 1024**2}
    cleaned = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if cleaned.endswith(unit) and cleaned[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(cleaned[: -len(unit)]) * units[unit])
    if cleaned.isdigit():
        return int(cleaned)
    raise typer.BadParameter(f"{text!r} is not a size; write one such as 8GB, 512MB or 900000KB")


@app.command()
def worker(
    device: Annotated[
        list[str] | None,
        typer.Option(help="Device(s) to run on, e.g. cuda:1 (repeat or comma-separate for "
                          "several: one process each). Default: OPENEDITS_DEVICE."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="Processes per device.")
    ] = 1,
    max_tasks_per_child: Annotated[
        int | None, typer.Option(min=1, help="Replace a process after this many tasks.")
    ] = None,
    max_memory_per_child: Annotated[
        str | None,
        typer.Option(help="Replace a process after a task leaves it above this resident "
                          "memory (e.g. 8GB)."),
    ] = None,
    drain_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="On SIGTERM, running tasks get this long to finish; then they "
                                 "go back to pending for another worker (default: "
                                 "OPENEDITS_DRAIN_SECONDS)."),
    ] = None,
) -> None:
    """Run Celery workers that execute tasks (needs OPENEDITS_BROKER_URL)."""
    settings = _settings()
    if not settings.broker_url:
        typer.echo(
            "openedits: worker needs OPENEDITS_BROKER_URL=redis://host:6379/0 (and the "
            "PostgreSQL and S3 settings the API nodes use); without a broker, `openedits serve` "
            "runs tasks itself",
            err=True,
        )
        raise typer.Exit(2)
    _configure_logging(settings)
    from openedits.workers.celery_app import WorkerOptions, run_worker

    devices = [d.strip() for item in device or [] for d in item.split(",") if d.strip()]
    options = WorkerOptions(
        devices=devices or settings.devices,
        concurrency=concurrency,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child_kb=parse_memory(max_memory_per_child)
        if max_memory_per_child else None,
        loglevel=settings.log_level.upper(),
        drain_seconds=settings.drain_seconds if drain_seconds is None else drain_seconds,
    )
    run_worker(settings, options)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (serve does this on start too)."""
    from openedits.store.database import create_db_engine
    from openedits.store.database import migrate as run_migrations

    settings = _settings()
    engine = create_db_engine(settings.resolved_database_url)
    run_migrations(engine)
    typer.echo(f"schema up to date at {engine.url.render_as_string(hide_password=True)}")


def _token_store() -> TokenStore:
    from openedits.store.database import create_db_engine
    from openedits.store.database import migrate as run_migrations
    from openedits.store.tokens import TokenStore

    engine = create_db_engine(_settings().resolved_database_url)
    run_migrations(engine)
    return TokenStore(engine)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="A label for the token.")] = "default",
    scope: Annotated[
        list[str] | None, typer.Option(help="edits, tasks or admin; repeat for several.")
    ] = None,
) -> None:
    """Create a token and print its secret (shown once)."""
    store = _token_store()
    try:
        secret, info = store.create(name, scope or ["edits", "tasks"])
    except ValueError as exc:
        typer.echo(f"openedits: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{info.id}\t{','.join(info.scopes)}\t{secret}")


@tokens_app.command("list")
def tokens_list() -> None:
    """List tokens (ids, names, scopes, revoked or not); secrets are never shown again."""
    store = _token_store()
    for info in store.list():
        state = "revoked" if info.revoked_at else "active"
        typer.echo(f"{info.id}\t{info.name}\t{','.join(info.scopes)}\t{state}")


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The tok_… id.")]) -> None:
    """Revoke a token by id."""
    store = _token_store()
    if not store.revoke(token_id):
        typer.echo(f"openedits: no active token {token_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {token_id}")


@app.command("webhook-secret")
def webhook_secret() -> None:
    """Print the `whsec_` secret callbacks are signed with (generated and kept on first use),
    for the receivers' Standard Webhooks verification."""
    from openedits.engines.registry import build_engine
    from openedits.runtime import Runtime

    settings = _settings()
    # Any engine will do: only the store is used, and opencv is cheap to construct.
    rt = Runtime.build(settings, engine=build_engine(settings, "opencv"))
    try:
        typer.echo(rt.webhook_secret())
    finally:
        rt.close()


def _register_client_commands() -> None:
    try:
        from openedits.client._command import register
    except ImportError:
        return
    register(app)


def main() -> None:
    """Entry point of the console script."""
    _register_client_commands()
    app()
