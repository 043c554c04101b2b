"""pvbus guest (placeholder)."""

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("guest")
    p.set_defaults(handler=lambda a: 0)
