"""Shared CLI helpers."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as ``pvbus: <message>`` and exit status 2."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
