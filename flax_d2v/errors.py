"""The one exception type a user sees.

Every error caused by the user's input (a missing file, a bad key, an unreadable clip) is raised
as `D2VError` with a one-line message that names the file or key at fault. The `d2v` command
prints that line and exits non-zero instead of showing a traceback.
"""


class D2VError(Exception):
    """An error in the user's input: the message names the file or key at fault."""
