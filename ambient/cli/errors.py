"""The one user-facing error of ambientctl's commands."""

from __future__ import annotations

from typing import Any

import click


class CliError(click.ClickException):
    """A user-facing error: printed as `error: ...`, exit 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)
