"""User-facing errors.

Every mistake a user can make (a bad cluster spec, a model file without
``get_model``, a model that fits nowhere) raises :class:`UserError` with a
one-paragraph message that names the problem and the fix. The CLI prints the
message and exits with code 2, without a traceback. Internal invariants use
``assert``.
"""


class UserError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = 2
