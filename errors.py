"""The one exception type meant for the user.

Every layer (tokenizer, data, train) raises `UserError` for bad input: a missing file, a
corrupt checkpoint, an impossible setting. Its message is one line that says what is
wrong, where, and what to do. The entry points catch it, print the message and exit
non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user, reported as a single line without a traceback."""
