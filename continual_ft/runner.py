"""Alias kept for one release (0.1): ``continual_ft.runner`` is now :mod:`continual_ft.run.runner`."""

from continual_ft.run.runner import *  # noqa: F403
from continual_ft.run.runner import __all__  # noqa: F401
