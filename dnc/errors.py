"""Exceptions shared by the stages."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the message names the run and where it happened."""
