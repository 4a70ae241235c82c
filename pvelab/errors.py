"""One error base class for everything an operator can be told in one line.

Every failure pvelab expects (a bad lab file, a missing host tool, a failed tool run,
a refused publish, a VM that does not come up) is a :class:`PvelabError` whose text is
the operator-facing message; ``tasks.py`` catches this one class and exits 2.
"""


class PvelabError(Exception):
    """An expected failure; ``str(exc)`` is the message for the operator."""

    exit_code = 2
