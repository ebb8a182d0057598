"""Errors the user can fix, with their meaning in their type.

This module sits at the bottom of the layers (``app -> annotation, db -> dmad_core``) so that every
layer may raise them. Each edge maps the type once, never the message text:

=================  ===============  ===========  =====================
type               CLI exit code    HTTP status  Streamlit
=================  ===============  ===========  =====================
``NotFound``       2                404          ``st.warning``
``Invalid``        2                422          ``st.error``
``TooLarge``       2                413          ``st.error``
``Conflict``       2                409          ``st.error``
``Unavailable``    2                503          ``st.error``
``UserError``      2                422          ``st.error``
=================  ===============  ===========  =====================

(``app/cli.py`` and ``app/ui/context.py`` hold the CLI's and Streamlit's tables; the HTTP statuses are
:data:`HTTP_STATUS` below, the one table that both HTTP edges answer by: the Label Studio webhook
(``annotation/webhook.py``) and ``dmad serve`` (``app/api``), which may not import each other.)
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The base of every error below; raise a subclass, which says what kind of problem it is.
    """



class NotFound(UserError):
    """Something the request names does not exist (an image, a category, a version, a file)."""


class Invalid(UserError):
    """The input itself is wrong (a malformed mask, an unreadable image, a bad option)."""


class TooLarge(Invalid):
    """The input is over a size limit (an upload's bytes or pixels)."""


class Conflict(UserError):
    """The request is fine but the current state does not allow it (already running, port taken,
    nothing to roll back to)."""


class Unavailable(UserError):
    """A service the request needs is not running or not answering (Label Studio, the database)."""


# The HTTP status of each type (the first matching type wins, so a subtype comes before its base).
HTTP_STATUS: dict[type[UserError], int] = {NotFound: 404, TooLarge: 413, Invalid: 422, Conflict: 409, Unavailable: 503}


def http_status(exc: UserError) -> int:
    """The HTTP status an edge answers for ``exc``, from its type (422 for a plain ``UserError``).

    Args:
        exc: the error a service raised.

    Returns:
        The status code.
    """
    for kind, status in HTTP_STATUS.items():
        if isinstance(exc, kind):
            return status
    return 422
