"""The one error type for user mistakes (bad files, keys, flags).

The command line prints a `UserError` as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or flag at fault."""
