"""The one exception type for a user's mistakes.

A command (``jpeglm prepare``, ``generate``, ``fit`` ...) prints a :class:`UserError` as one line,
``jpeglm <command>: error: <message>``, and exits 2; any other exception is a bug and keeps its traceback.
Raise it where the library can tell that what it was asked to do is wrong (a missing path, a ratio out of
range, a checkpoint that is not a jpeglm one), with a message that says what to do instead.
"""

from __future__ import annotations


class UserError(ValueError):
    """What the user asked for is wrong: the message says what and what to do (a ``ValueError``, so code
    that caught ``ValueError`` before keeps working)."""
