"""Prefect flows: one per file, each with a pydantic config and a ``__main__``."""
from flows._env import apply_defaults

apply_defaults()
