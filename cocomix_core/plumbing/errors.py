"""The project's own error class: a problem with an input or a state, worded for the user.

Every error the library raises on purpose derives from `CocomixError` (beside the builtin class it
always had, so `except ValueError` still catches a DataError). The command lines catch it at `main`
and print its one-line message; anything else is a bug and keeps its traceback.
"""


class CocomixError(Exception):
    """Base of the project's errors: the message names the culprit (setting, file, folder) and what to do."""
