"""The one exception type for mistakes a user can fix (bad config, missing file, unreadable score).

The CLI catches it and prints its message alone, with no traceback, and exits with status 2.
Messages should name the file, the line or key, what was wrong, and how to fix it.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
