"""The one exception type every operational failure becomes, so the CLI can print it as one line."""


class Failed(Exception):
    """The operation failed (exit status 1); the message is the one line the user sees."""


class UsageError(Failed):
    """The command line asks for something impossible (exit status 2, like argparse's own errors)."""
