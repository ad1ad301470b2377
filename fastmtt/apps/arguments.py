"""Checks of command-line arguments that the commands share (cli.py parses, the apps run; both import this).

Each raises UsageError naming the flag. No torch at module level: `fastmtt --help` answers at once.
"""
from __future__ import annotations

import os
import re

from fastmtt.apps import UsageError
from fastmtt.options import MTTOptions


def check_options(**settings) -> MTTOptions:
    """MTTOptions(**settings), its errors as a UsageError naming the command-line flag."""
    try:
        return MTTOptions(**settings)
    except (TypeError, ValueError) as exc:
        subject = re.findall(r"\w+", str(exc).split(" must ")[0])  # "lam * temperature**2 must ..." names both
        flags = "/".join(f"--{name}" for name in settings if name in subject)
        raise UsageError(f"{flags}: {exc}" if flags else str(exc)) from exc


def check_file(flag: str, path: str) -> str:
    """`path` is an existing file, else a UsageError naming `flag`."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file: {path}")
    return path


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when CUDA is present, else 'cpu'; any other name must be a device torch can use here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: not a device to run on (use cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return "cpu" if device.type == "cpu" else name
