"""Commands along the model's lifecycle: the main job, its single steps, the registry, retraining, the demo.

The flows (Prefect) and the model's loader (MLflow, TensorFlow) take seconds to import: the commands
that need them import them, so `hematovision --help` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hematovision import progress, stores
from hematovision.cli.common import ParamsOption, ProfileOption, console, fail, read_params
from hematovision.data.dvc import DataImportError, import_data
from hematovision.demo import DemoConfig, run_demo
from hematovision.progress import cli_logger, console_progress, logging_progress
from hematovision.registry.registry import RegistryError
from hematovision.settings import get_settings
from hematovision.training.evaluate import evaluate_folder
from hematovision.training.retrain import RetrainError
from hematovision.training.steps import evaluate_step, prepare_step, promote_step, register_step, train_step

data_app = typer.Typer(help="Dataset versions (DVC).", no_args_is_help=True)


def run(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    promote: Annotated[bool, typer.Option(help="Promote the new model if the gate passes.")] = True,
):
    """Run the whole training flow: import data, prepare, train, evaluate, register, promote."""
    read_params(params_file, profile)  # fail fast on a bad profile, before Prefect is even imported
    from flows.training import training_flow

    with progress.console_progress() as report:
        progress.current = report
        try:
            summary = training_flow(profile=profile, params_file=str(params_file), promote=promote)
        finally:
            progress.current = None
    _print_summary(summary)
    if promote and not summary["gate"]["passed"]:
        raise typer.Exit(1)


def _print_summary(summary: dict) -> None:
    settings = get_settings()
    table = Table(title="HematoVision training run", show_header=False)
    table.add_row("data version (md5)", summary["data_hash"])
    table.add_row("MLflow run", summary["run_id"])
    table.add_row("model version", f"{settings.registry.registered_model} v{summary['version']}")
    for split in ("val", "test", "new_site"):
        m = summary["metrics"].get(split)
        if m:
            row = f"accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
            if "cell_accuracy" in m:
                lo, hi = m["cell_accuracy_ci95"]
                row += f"  cell accuracy {m['cell_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] ({m['n_cells']} cells)"
            table.add_row(split, row)
    gate = summary["gate"]
    table.add_row("promotion", ("champion" if gate["passed"] else "NOT promoted") + ": " + "; ".join(gate["reasons"]))
    Console().print(table)
    Console().print(
        f"MLflow UI:  uv run mlflow ui --backend-store-uri {settings.tracking_uri}  (then http://127.0.0.1:5000)\n"
        f"Metrics:    {settings.path(settings.paths.reports_dir) / 'metrics.json'}\n"
        f"Champion:   models:/{settings.registry.registered_model}@champion"
    )


@data_app.command("import")
def data_import():
    """Import (or re-check) the upstream dataset into data/ under DVC; prints the pinned version."""
    try:
        with console.status("importing the dataset with DVC"):
            result = import_data(get_settings())
    except DataImportError as error:
        fail(str(error))
    if result["changed"]:
        console.print(
            f"[yellow]the upstream dataset changed:[/] {result['pinned_hash']} -> {result['data_hash']};"
            " commit data.dvc to pin the new version"
        )
    print(json.dumps(result, indent=2))


def prepare(profile: ProfileOption = None, params_file: ParamsOption = Path("params.yaml")):
    """Validate every image, find which images show the same cell, make the grouped train/val split."""

    with console_progress(logging_progress(cli_logger())) as report:
        summary = prepare_step(get_settings(), read_params(params_file, profile), report)
    print(json.dumps(summary, indent=2))


def train(profile: ProfileOption = None, params_file: ParamsOption = Path("params.yaml")):
    """Train (frozen-backbone head, then fine-tune) and log the run to MLflow."""

    with console_progress(logging_progress(cli_logger())) as report:
        result = train_step(get_settings(), read_params(params_file, profile), report)
    console.print(
        f"run {result['run_id']}: val accuracy {result['val']['accuracy']:.3f}, macro-F1 {result['val']['macro_f1']:.3f}"
    )


def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to score: models:/hematovision@champion, runs:/..., or a saved classifier folder. Without it: the pipeline's evaluate stage."
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Folder of class-named subfolders (names case-insensitive).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON only.")] = False,
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
):
    """Score a model: the pipeline's stage (TEST and the new site), or any model on any folder."""
    params = read_params(params_file, profile)
    if model is None and data is None:
        with console_progress(logging_progress(cli_logger())) as report:
            results = evaluate_step(get_settings(), params, report)
        print(
            json.dumps(
                {
                    k: {m: v[m] for m in ("accuracy", "macro_f1") if m in v}
                    for k, v in results.items()
                    if k != "timings"
                },
                indent=2,
            )
        )
        return
    if model is None or data is None:
        fail("give both --model and --data (or neither, for the pipeline's evaluate stage)")
    if not data.is_dir():
        fail(f"{data} is not a folder")
    from hematovision.registry.packaging import load_classifier  # heavy: imports MLflow and Keras

    settings = get_settings()
    stores.registry(settings)  # MLflow pointed at the configured store, for models:/ URIs
    try:
        classifier = load_classifier(model)
        # Through the embedding cache: chunked (so a progress bar), and a second look at the same
        # folder with the same model reads the embeddings back instead of recomputing them.
        with stores.embedding_cache(settings) as cache, console_progress(logging_progress(cli_logger())) as report:
            results = evaluate_folder(
                classifier,
                data,
                cache,
                params.evaluate.bootstrap_samples,
                seed=params.seed,
                progress=lambda done, total: report(f"evaluating {data}", done, total),
            )
    except ValueError as error:
        fail(str(error))
    except Exception as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error) or "not found" in str(error).lower():
            fail(f"no model at {model}: {error}")
        raise
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        console.print_json(
            json.dumps(
                {
                    k: results[k]
                    for k in (
                        "n_images",
                        "accuracy",
                        "macro_f1",
                        "per_class",
                        "unknown_folders",
                        "unknown_rate",
                        "unknown_rate_by_label",
                        "open_set_auroc",
                        "ece",
                    )
                    if k in results
                }
            )
        )


def register(profile: ProfileOption = None, params_file: ParamsOption = Path("params.yaml")):
    """Register the last trained model as a new version with the 'challenger' alias (and, with
    export.int8, its int8 flavour)."""
    result = register_step(get_settings(), read_params(params_file, profile))
    console.print(f"registered {get_settings().registry.registered_model} v{result['version']} (alias challenger)")


def promote(
    version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    force: Annotated[bool, typer.Option(help="Promote even if the gate refuses (recorded on the version).")] = False,
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
):
    """Make VERSION the champion if it passes the gate; prints the gate's reasons either way."""

    try:
        decision = promote_step(get_settings(), read_params(params_file, profile), version, force)
    except RegistryError as error:
        fail(str(error))
    for reason in decision.reasons:
        console.print(f"  - {reason}")
    if not decision.passed:
        fail(f"version {version} was NOT promoted")
    console.print(f"[green]version {version} is the champion[/]")


def rollback():
    """Move 'champion' back to the version that held it before."""

    settings = get_settings()
    try:
        old, new = stores.registry(settings).rollback()
    except RegistryError as error:
        fail(str(error))
    console.print(f"[green]champion rolled back from v{old} to v{new}[/]")


def models():
    """List the registered versions with their aliases and headline metrics."""

    settings = get_settings()
    registry = stores.registry(settings)
    table = Table("version", "aliases", "val macro-F1", "test acc", "new-site acc", "data", "commit", "gate")
    for v in sorted(
        registry.client.search_model_versions(f"name='{settings.registry.registered_model}'"),
        key=lambda v: int(v.version),
    ):
        tags = v.tags
        table.add_row(
            str(v.version),
            ",".join(v.aliases),
            tags.get("val_macro_f1", ""),
            tags.get("test_accuracy", ""),
            tags.get("new_site_accuracy", ""),
            tags.get("data_hash", "")[:8],
            tags.get("git_commit", "")[:8],
            tags.get("gate", "")[:60],
        )
    Console().print(table)


def retrain(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    promote: Annotated[bool, typer.Option(help="Promote the challenger if the gate passes.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only.")] = False,
):
    """Retrain on raw data + the pathologists' corrections; promote only if it wins on the new site's
    held-out corrections without losing on TEST. Exit 1 when the gate refuses."""
    read_params(params_file, profile)  # fail fast on a bad profile, before Prefect is even imported
    from flows.retraining import retraining_flow

    with progress.console_progress() as report:
        progress.current = report
        try:
            summary = retraining_flow(profile=profile, params_file=str(params_file), promote=promote)
        except RetrainError as error:
            fail(str(error))
        finally:
            progress.current = None
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_retrain_summary(summary)
    if promote and not summary["promoted"]:
        raise typer.Exit(1)


def print_retrain_summary(summary: dict) -> None:
    if summary.get("skipped"):
        Console().print(f"[yellow]no challenger:[/] {summary['skipped']}")
        return
    table = Table(
        "",
        "champion (parent)",
        "challenger",
        title=f"Retraining: v{summary['version']} vs v{summary['parent_version']}",
    )
    for key, label in (
        ("holdout_accuracy", "new-site holdout accuracy"),
        ("holdout_macro_f1", "new-site holdout macro-F1"),
        ("test_accuracy", "TEST accuracy"),
        ("test_macro_f1", "TEST macro-F1"),
    ):
        if key in summary["challenger"]:
            table.add_row(label, f"{summary['champion'][key]:.4f}", f"{summary['challenger'][key]:.4f}")
    c = summary["corrections"]
    table.add_row(
        "corrections",
        f"{c['exported']} exported ({c['added']} new)",
        f"{c['train']} trained on, {c['holdout']} held out",
    )
    table.add_row(
        "lineage",
        f"data {summary['data_hash'][:8]}, corrections {summary['corrections_hash'][:8]}",
        f"parent v{summary['parent_version']}, mode {summary['mode']}",
    )
    table.add_row("wall time", "", ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items()))
    Console().print(table)
    verdict = "[green]PROMOTED[/]" if summary["promoted"] else "[yellow]NOT promoted[/]"
    Console().print(f"{verdict} v{summary['version']}: " + "; ".join(summary["gate"]["reasons"]))


def demo(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    test_images: Annotated[
        int, typer.Option(help="Official TEST images streamed through /predict (no drift expected).")
    ] = 200,
    new_site_images: Annotated[
        int, typer.Option(help="New-site (pbc-sample) images streamed, of which --corrections are corrected.")
    ] = 600,
    corrections: Annotated[int, typer.Option(help="New-site predictions the simulated pathologist corrects.")] = 400,
    eval_images: Annotated[int, typer.Option(help="New-site images never corrected, scored before and after.")] = 200,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the service to answer with the new version.")
    ] = 180.0,
):
    """The whole story: champion, service, traffic, drift check, corrections, retraining, hot swap."""
    read_params(params_file, profile)
    config = DemoConfig(
        profile=profile,
        params_file=str(params_file),
        test_images=test_images,
        new_site_images=new_site_images,
        corrections=corrections,
        eval_images=eval_images,
        swap_timeout_s=timeout,
    )
    result = run_demo(get_settings(), config, say=lambda m: Console().print(m))
    if not result["swapped"]:
        raise typer.Exit(1)
