"""The one error type a user ever sees: a one-line message and exit code 2, never a traceback."""

import click


class VaegenError(click.ClickException):
    """Bad input or an input that does not match what a stage expects.

    Raised anywhere in the library; click prints ``Error: <message>`` on one line and exits with code 2.
    Plain-function callers (tests, notebooks) get an ordinary exception with the same message.
    """

    exit_code = 2
