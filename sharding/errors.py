"""The one exception type for bad input: the CLI prints it as a single line and exits 2."""


class InputError(Exception):
    """Bad input or a bad corpus. The message names the file, the field and the fix."""
