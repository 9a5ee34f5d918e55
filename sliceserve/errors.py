"""The one exception type that the command line turns into a one-line message, and the mark a
stop request leaves for the code that turns library errors into it."""

import threading


class SliceserveError(Exception):
    """A problem with the user's input or files: reported in one line, no traceback."""


# Set by the command line's SIGTERM handler before it raises KeyboardInterrupt. The interrupt can
# land inside a library's read, which may then fail with an error of its own (safetensors:
# "could not determine the shape of object type 'torch.storage.UntypedStorage'"); code that
# reports library errors as a SliceserveError checks this first, so that a stop stays a stop.
INTERRUPTED = threading.Event()


def unless_interrupted(error: SliceserveError) -> SliceserveError:
    """`error`, or the KeyboardInterrupt of a stop request that caused the library's error."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
    return error
