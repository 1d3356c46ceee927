"""The one error type c2i_fast raises for bad input; the CLI turns it into a message and exit code 2."""


class C2IError(Exception):
    """A user-facing error: the message names the file, line or parameter at fault."""
