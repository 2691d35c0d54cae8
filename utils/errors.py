"""Errors that mean "the user's input is wrong": the tools print them as one line (exit 2).

Raise :class:`UserError` (or a subclass) where bad input is detected, naming the file, key or
value and what was expected. Any other exception is a bug and shows its traceback. This module
imports nothing from the project, so every layer can use it.
"""


class UserError(ValueError):
    """A problem with a config, data, checkpoint, run folder or command-line value."""


class NonFiniteLossError(UserError):
    """The loss became NaN/Inf (usually the learning rate or the data); training stopped."""


# what a tool reports as one line: UserError (every project error type derives from it) and a
# missing file
USER_ERRORS = (UserError, FileNotFoundError)
