"""The scoring API's error answers, in one shape (``{"detail": "<what to fix>"}``): typed errors become
statuses through the one table (``dmad_core.errors.HTTP_STATUS``), a full queue 503 with Retry-After,
FastAPI's own parameter errors 422, a missing or wrong token 401."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.api.deps import Unauthorised
from dmad_core.errors import Invalid, UserError, http_status


class UnsupportedBody(Invalid):
    """The body is neither an image nor a multipart upload (415)."""


async def unauthorised(request: Request, exc: Unauthorised) -> JSONResponse:
    return JSONResponse({"detail": "send Authorization: Bearer <token> (the home's serve_token secret)"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter errors, in the one error shape."""
    problems = "; ".join(f"{' '.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                         for e in exc.errors())
    return JSONResponse({"detail": problems or "invalid request"}, status_code=422)


async def user_error(request: Request, exc: UserError) -> JSONResponse:
    status = 415 if isinstance(exc, UnsupportedBody) else http_status(exc)
    retry_after = getattr(exc, "retry_after", None)  # QueueFull, the spool's SpoolFull
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    # Starlette types a handler as taking any Exception; each of these takes the one it is registered for
    app.add_exception_handler(Unauthorised, unauthorised)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(UserError, user_error)  # type: ignore[arg-type]
