"""Commands that gather evidence for choosing a recipe: cross-validation over TRAIN's cells (never TEST).

The flow (Prefect) and training (TensorFlow) take seconds to import: the command imports them when
it runs, so `hematovision --help` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hematovision import progress
from hematovision.cli.common import ParamsOption, ProfileOption, console, fail
from hematovision.training import cv as cross_validation


def cv(
    recipes: Annotated[
        str,
        typer.Option(help="Comma-separated recipes: 'default' or profiles of params.yaml, each on top of --profile."),
    ] = cross_validation.DEFAULT_RECIPE,
    folds: Annotated[int, typer.Option(help="Folds of whole cells (k).")] = 5,
    seed: Annotated[int | None, typer.Option(help="Seed of the fold assignment (default: params' seed).")] = None,
    parallel: Annotated[
        int, typer.Option(help="Folds trained at once (threads; one already uses every CPU core).")
    ] = 1,
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only.")] = False,
):
    """Cross-validate recipes on grouped folds of TRAIN's cells (TEST untouched): mean and interval
    per metric, logged under one MLflow parent run. This, not TEST, is how a recipe is chosen."""
    try:
        names = cross_validation.parse_recipes(recipes)
        for name in names:
            cross_validation.recipe_params(params_file, name, profile)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    if folds < 2:
        console.print(f"[red]error:[/] cross-validation needs at least 2 folds, not {folds}")
        raise typer.Exit(2)
    from flows.cv import run_cv  # heavy: imports Prefect and, through training, Keras

    with progress.console_progress() as report:
        progress.current = report
        try:
            result = run_cv(names, folds, seed, str(params_file), profile, parallel)
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
        finally:
            progress.current = None
    summary = result["summary"]
    if as_json:
        print(json.dumps({"parent_run_id": result["parent_run_id"], **summary}, indent=2, default=str))
        return
    print_summary(summary, result["parent_run_id"])


def print_summary(summary: dict, parent_run_id: str) -> None:
    metrics = [m for m in summary["metrics"] if m not in cross_validation.COSTS]
    level = f"{summary['confidence']:.0%}"
    table = Table(
        "recipe",
        *metrics,
        "s per fold",
        "answers/s/core",
        title=f"Cross-validation: {summary['folds']} folds of TRAIN's cells (seed {summary['seed']}), "
        f"mean [{level} interval]",
    )
    for recipe in summary["recipes"]:
        s = summary["by_recipe"][recipe]
        table.add_row(
            recipe,
            *(cross_validation.format_interval(s.get(m)) for m in metrics),
            cross_validation.format_interval(s.get("fold_s"), "{:.0f}"),
            cross_validation.format_interval(s.get("answers_per_s_per_core"), "{:.1f}"),
        )
    out = Console()
    out.print(table)
    first = summary["recipes"][0]
    for recipe, diffs in summary["vs_first"].items():
        out.print(
            f"{recipe} - {first} (paired, same folds): "
            + ", ".join(f"{m} {cross_validation.format_interval(d, '{:+.3f}')}" for m, d in diffs.items())
        )
    out.print(f"MLflow parent run: {parent_run_id}")
