"""The one exception type that the command line turns into a one-line message."""


class SliceserveError(Exception):
    """A problem with the user's input or files: reported in one line, no traceback."""
