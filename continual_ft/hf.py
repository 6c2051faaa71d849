"""Alias kept for one release (0.1): ``continual_ft.hf`` is now :mod:`continual_ft.integrations.hf_trainer`."""

from continual_ft.integrations.hf_trainer import *  # noqa: F403
from continual_ft.integrations.hf_trainer import __all__  # noqa: F401
