"""Run sizes of the demo and the experiment: a preset's values with the command line's overrides."""
from __future__ import annotations

from typing import Dict


def config_for(config_class, presets: Dict[str, dict], preset: str, **overrides):
    """config_class(**presets[preset], **overrides): None overrides are ignored (the option was not given) and
    lists become tuples. A ValueError naming `preset` for an unknown one."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    return config_class(**{**presets[preset], **{key: tuple(value) if isinstance(value, list) else value
                                                 for key, value in overrides.items() if value is not None}})
