"""The ``pvbus`` command: thin argument parsing over validated configuration.

Each sub-command lives in its own module exposing ``register(subparsers)``; the handler it sets
returns the process exit status. Errors a user can act on are raised as :class:`CliError` and
printed as one line.
"""

from pvbus.cli._common import CliError

__all__ = ["CliError"]
