"""The one exception type users see: its message is a single line saying what is wrong and what to do."""


class ToolkitError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI exit code 2)."""
