"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2.

`UserError` is defined in `rewards.errors` (the reward package imports nothing from rlpost) and
re-exported here, so `except UserError` catches errors raised by rewards and by rlpost alike.
"""

from rewards.errors import UserError

__all__ = ["UserError"]
