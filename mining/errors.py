"""The one exception users see: a single line saying what is wrong and what to do."""


class UserError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 2."""
