"""The playground page at / and its static assets at /web/."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from openedits.errors import NotFound

__all__ = ["WEB_DIR", "router"]

router = APIRouter(include_in_schema=False)
WEB_DIR = Path(__file__).resolve().parents[2] / "web"


@router.head("/")
@router.get("/")
def index() -> FileResponse:
    """The playground page."""
    page = WEB_DIR / "index.html"
    if not page.is_file():
        raise NotFound("the playground page is not installed")
    return FileResponse(page, media_type="text/html")
