"""The one exception type users see: its message is a single line saying what is wrong and what to do."""


class ToolkitError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI exit code 2)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]
