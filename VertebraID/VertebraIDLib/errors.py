"""The one exception type whose message is shown to a user as is."""


class VertebraIDError(Exception):
    """A problem the user can fix (bad input, missing file...). The message is one sentence."""
