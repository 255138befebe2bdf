"""Errors that reach the user as one line.

Library code raises `MemtoolError` for anything the user can fix (bad path, bad size, data too
short); the CLI prints its message on one line and exits with code 2. `ThresholdNotMet` is not an
error of the input: the CLI maps it to exit code 1.
"""


class MemtoolError(Exception):
    """A problem the user can act on; the message names the problem and what to do."""


class ThresholdNotMet(Exception):
    """A requested gate (for example --max-perplexity) was not met."""
