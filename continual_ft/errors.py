"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class ContinualFTError(Exception):
    """A problem with the user's input: a config value, a name, a data file.

    The message is complete on its own (it names the file, line or key) so the CLI
    can print it as a single line and exit non-zero.
    """
