"""Errors the user can fix. The CLI prints them as one clear line (no traceback) and exits 2."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
