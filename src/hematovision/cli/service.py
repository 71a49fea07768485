"""Commands for answering: the service, local batch predictions, and the prediction log's retention."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from hematovision import stores
from hematovision.api.process import with_workers
from hematovision.cli.common import console, fail
from hematovision.progress import cli_logger, console_progress, logging_progress
from hematovision.serving.batch_predict import collect_images, predict_files, write_results
from hematovision.serving.retention import retention_pass
from hematovision.settings import get_settings

predictions_app = typer.Typer(help="The prediction log and retained images.", no_args_is_help=True)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: serving.workers, HEMATOVISION_SERVE_WORKERS).")
    ] = None,
):
    """Serve the champion over HTTP (BentoML): web page at /ui/, API docs at /docs, hot swap on promote.

    Each worker process holds its own model, alias watcher and batcher; the workers, and replicas on
    other hosts, share the registry, the prediction log and the lab database."""

    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml is None:
        fail("bentoml is not installed in this environment")
    settings = get_settings()
    workers = workers or settings.serving.workers
    console.print(
        f"serving models:/{settings.registry.registered_model}@{settings.serving.alias} "
        f"on http://{host}:{port}/ with {workers} worker(s) (web page /ui/, API docs /docs)"
    )
    os.execve(
        bentoml,
        [bentoml, "serve", "hematovision.api.service:HematoVision", "--host", host, "--port", str(port)],
        with_workers(dict(os.environ), workers),
    )


def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results file: .csv or .json.")] = Path("predictions.csv"),
    model: Annotated[
        str | None, typer.Option(help="Model URI or saved classifier folder (default: the champion).")
    ] = None,
):
    """Predict the cell type of images locally (no server), with a progress bar; writes CSV or JSON."""
    from hematovision.registry.packaging import load_classifier  # heavy: imports MLflow and Keras

    settings = get_settings()
    if out.suffix.lower() not in (".csv", ".json"):
        console.print("[red]error:[/] --out must end in .csv or .json")
        raise typer.Exit(2)
    try:
        files = collect_images(paths)
    except FileNotFoundError as error:
        fail(str(error))
    if not files:
        fail("no image files found")
    stores.registry(settings)  # MLflow pointed at the configured store, for models:/ URIs
    uri = model or f"models:/{settings.registry.registered_model}@{settings.serving.alias}"
    try:
        classifier = load_classifier(uri)
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for a missing model
        fail(f"cannot load {uri}: {error}")
    with console_progress(logging_progress(cli_logger())) as report:
        rows = predict_files(classifier, files, settings.serving.review_threshold, progress=report)
    write_results(rows, out, classifier.classes)
    failed = sum(1 for r in rows if r.get("error"))
    review = sum(1 for r in rows if r.get("needs_review"))
    console.print(f"{len(rows)} images -> {out} ({review} need review, {failed} could not be read)")


@predictions_app.command("purge")
def predictions_purge(
    older_than_days: Annotated[
        float | None, typer.Option(help="Images older than this (default: retain_images_days, review_image_days).")
    ] = None,
):
    """A whole retention pass now, as each serving worker runs one every purge_interval_minutes:
    retained images (by age, then the disk budget), old prediction embeddings, correction images if
    the lab set a retention, the embedding cache if set (patient privacy)."""
    counts = retention_pass(get_settings(), older_than_days)
    console.print(f"removed {counts.pop('images')} retained image(s)")
    for kind, count in counts.items():
        console.print(f"{kind.replace('_', ' ')}: {count} removed")
