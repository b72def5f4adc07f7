"""`kit` commands for the service area (filled in by that area's issue)."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
