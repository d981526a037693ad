"""The built-in web chat: a single page at `/` that talks to the server's own `/v1/chat/completions`.

The page is three static files in `static/` (HTML, CSS and dependency-free JavaScript): no build step,
no CDN, nothing fetched from the network at run time. It is not behind the API key (only `/v1/*` is);
the page asks for the key when the API answers 401. Model output is put into the page as text nodes only
(a small Markdown renderer builds the elements), never as HTML.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
# A second line of defence behind the text-only rendering: no inline scripts or handlers, nothing from
# other origins.
SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def add_webchat(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/static/`."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
