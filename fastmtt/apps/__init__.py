"""The `fastmtt` command line and its applications (demo, finetune, compile-check)."""
import os
import tempfile

# Constants the command line checks its arguments against (kept here: this module imports no torch).
SMOLLM2_LAYERS = 30  # decoder layers of SmolLM2-135M, the model of `fastmtt experiment`
# CUDA compute capabilities that Triton 3.9 compiles every kernel for (others, e.g. 0 or 101, abort inside LLVM);
# Triton 3.6 (the floor) refuses 110 with a per-kernel ptxas error, reported as a FAIL line.
KNOWN_ARCHS = (70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)
# The grid axes of `fastmtt experiment` (fastmtt.apps.experiment documents each).
ADDITION_DIGITS = {"addition": 3, "addition2": 2}  # task -> digits of its operands
EXPERIMENT_TASKS = (*ADDITION_DIGITS, "license")
FULLY_LABELLED_TASKS = ("license",)  # every predicted position has a label: kl_positions "all" is "labels" there
EXPERIMENT_ADAPTERS = ("lora", "dora", "randlora", "sinelora")
EXPERIMENT_METHODS = ("ce", "kl", "mtt")


class UsageError(ValueError):
    """A mistake in the user's command or input files: the command line prints its message as one line
    and exits with status 2 (no traceback unless --debug or FASTMTT_DEBUG=1)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_out_dir(flag: str, path: str, contents: str, create: bool = False) -> str:
    """`path` is, or can become, a writable folder for `contents`; create=True makes it and writes a probe
    file there (the check before long work), otherwise nothing is written. A UsageError naming `flag` if not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a file; give a folder for {contents}")
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
            return path
        existing = os.path.abspath(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(0, "not a folder", existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(0, "not writable", existing)
    except OSError as exc:
        where = f" ({exc.filename}: {exc.strerror})" if exc.filename else f" ({exc.strerror or exc})"
        raise UsageError(f"{flag}: cannot write {contents} to {path}{where}") from exc
    return path
