"""The `fastmtt` command line and its applications (demo, finetune, compile-check)."""


class UsageError(ValueError):
    """A mistake in the user's command or input files: the command line prints its message as one line
    and exits with status 2 (no traceback unless --debug or FASTMTT_DEBUG=1)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
