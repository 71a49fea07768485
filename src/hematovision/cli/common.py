"""What every command shares: the error console, the parameter options, failing with an exit code.

Exit codes scripts can trust: 0 done, 1 refused or failed (the gate said no, bad input), 2 usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from hematovision.params import Params, load_params

console = Console(stderr=True, soft_wrap=True)  # error lines stay whole for scripts that grep them
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Named parameter profile from params.yaml, e.g. 'quick' for smoke runs."),
]
ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (DVC-tracked).")]


def read_params(path: Path, profile: str | None) -> Params:
    """The parameters, or exit 2 with the reason (an unknown profile or parameter)."""
    try:
        return load_params(path, profile)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None


def fail(message: str) -> NoReturn:
    """Exit 1 with the reason: refused or failed."""
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)
