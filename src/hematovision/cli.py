"""The ``hematovision`` command: the lifecycle's steps, for people and for scripts.

Exit codes scripts can trust: 0 done, 1 refused or failed (the gate said no, bad input), 2 usage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from hematovision import progress, stores
from hematovision.data.dvc import DataImportError, import_data
from hematovision.demo import DemoConfig, run_demo
from hematovision.lab.accounts import AccountError
from hematovision.lab.export import export_corrections
from hematovision.monitoring.monitor import MonitoringError, workspace_project
from hematovision.params import load_params
from hematovision.progress import cli_logger, console_progress, logging_progress
from hematovision.registry.registry import RegistryError
from hematovision.serving.batch_predict import collect_images, predict_files, write_results
from hematovision.settings import get_settings
from hematovision.training.evaluate import evaluate_folder
from hematovision.training.retrain import RetrainError
from hematovision.training.steps import evaluate_step, prepare_step, promote_step, register_step, train_step

# The flows (Prefect) and the model's loader (MLflow, TensorFlow) take seconds to import: the
# commands that need them import them, so `hematovision --help` and the account commands stay quick.

app = typer.Typer(help="HematoVision: train, evaluate, register and promote the white-blood-cell classifier.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Dataset versions (DVC).", no_args_is_help=True)
app.add_typer(data_app, name="data")
predictions_app = typer.Typer(help="The prediction log and retained images.", no_args_is_help=True)
app.add_typer(predictions_app, name="predictions")
users_app = typer.Typer(help="Accounts of the people and systems using the service.", no_args_is_help=True)
app.add_typer(users_app, name="users")
feedback_app = typer.Typer(help="Pathologists' corrections.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
console = Console(stderr=True, soft_wrap=True)  # error lines stay whole for scripts that grep them
ProfileOption = Annotated[Optional[str], typer.Option("--profile", "-p", help="Named parameter profile from params.yaml, e.g. 'quick' for smoke runs.")]
ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (DVC-tracked).")]


def _params(path: Path, profile: str | None):
    try:
        return load_params(path, profile)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def run(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    promote: Annotated[bool, typer.Option(help="Promote the new model if the gate passes.")] = True,
):
    """Run the whole training flow: import data, prepare, train, evaluate, register, promote."""
    _params(params_file, profile)  # fail fast on a bad profile, before Prefect is even imported
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
        _fail(str(error))
    if result["changed"]:
        console.print(f"[yellow]the upstream dataset changed:[/] {result['pinned_hash']} -> {result['data_hash']};"
                      " commit data.dvc to pin the new version")
    print(json.dumps(result, indent=2))


@app.command()
def prepare(profile: ProfileOption = None, params_file: ParamsOption = Path("params.yaml")):
    """Validate every image, find which images show the same cell, make the grouped train/val split."""

    with console_progress(logging_progress(cli_logger())) as report:
        summary = prepare_step(get_settings(), _params(params_file, profile), report)
    print(json.dumps(summary, indent=2))


@app.command()
def train(profile: ProfileOption = None, params_file: ParamsOption = Path("params.yaml")):
    """Train (frozen-backbone head, then fine-tune) and log the run to MLflow."""

    with console_progress(logging_progress(cli_logger())) as report:
        result = train_step(get_settings(), _params(params_file, profile), report)
    console.print(f"run {result['run_id']}: val accuracy {result['val']['accuracy']:.3f}, macro-F1 {result['val']['macro_f1']:.3f}")


@app.command()
def evaluate(
    model: Annotated[Optional[str], typer.Option(help="Model to score: models:/hematovision@champion, runs:/..., or a saved classifier folder. Without it: the pipeline's evaluate stage.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Folder of class-named subfolders (names case-insensitive).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON only.")] = False,
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
):
    """Score a model: the pipeline's stage (TEST and the new site), or any model on any folder."""
    params = _params(params_file, profile)
    if model is None and data is None:
        with console_progress(logging_progress(cli_logger())) as report:
            results = evaluate_step(get_settings(), params, report)
        print(json.dumps({k: {m: v[m] for m in ("accuracy", "macro_f1") if m in v} for k, v in results.items() if k != "timings"}, indent=2))
        return
    if model is None or data is None:
        _fail("give both --model and --data (or neither, for the pipeline's evaluate stage)")
    if not data.is_dir():
        _fail(f"{data} is not a folder")
    from hematovision.registry.packaging import load_classifier  # heavy: imports MLflow and Keras

    settings = get_settings()
    stores.registry(settings)  # MLflow pointed at the configured store, for models:/ URIs
    try:
        classifier = load_classifier(model)
        # Through the embedding cache: chunked (so a progress bar), and a second look at the same
        # folder with the same model reads the embeddings back instead of recomputing them.
        with stores.embedding_cache(settings) as cache, console_progress(logging_progress(cli_logger())) as report:
            results = evaluate_folder(classifier, data, cache, params.evaluate.bootstrap_samples, seed=params.seed,
                                      progress=lambda done, total: report(f"evaluating {data}", done, total))
    except ValueError as error:
        _fail(str(error))
    except Exception as error:  # noqa: BLE001 - an unknown model URI surfaces as many MLflow error types
        if "RESOURCE_DOES_NOT_EXIST" in str(error) or "not found" in str(error).lower():
            _fail(f"no model at {model}: {error}")
        raise
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        console.print_json(json.dumps({k: results[k] for k in ("n_images", "accuracy", "macro_f1", "per_class", "unknown_folders")}))


@app.command()
def register():
    """Register the last trained model as a new version with the 'challenger' alias."""
    result = register_step(get_settings())
    console.print(f"registered {get_settings().registry.registered_model} v{result['version']} (alias challenger)")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    force: Annotated[bool, typer.Option(help="Promote even if the gate refuses (recorded on the version).")] = False,
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
):
    """Make VERSION the champion if it passes the gate; prints the gate's reasons either way."""

    try:
        decision = promote_step(get_settings(), _params(params_file, profile), version, force)
    except RegistryError as error:
        _fail(str(error))
    for reason in decision.reasons:
        console.print(f"  - {reason}")
    if not decision.passed:
        _fail(f"version {version} was NOT promoted")
    console.print(f"[green]version {version} is the champion[/]")


@app.command()
def rollback():
    """Move 'champion' back to the version that held it before."""

    settings = get_settings()
    try:
        old, new = stores.registry(settings).rollback()
    except RegistryError as error:
        _fail(str(error))
    console.print(f"[green]champion rolled back from v{old} to v{new}[/]")


@app.command()
def models():
    """List the registered versions with their aliases and headline metrics."""

    settings = get_settings()
    registry = stores.registry(settings)
    table = Table("version", "aliases", "val macro-F1", "test acc", "new-site acc", "data", "commit", "gate")
    for v in sorted(registry.client.search_model_versions(f"name='{settings.registry.registered_model}'"), key=lambda v: int(v.version)):
        tags = v.tags
        table.add_row(str(v.version), ",".join(v.aliases), tags.get("val_macro_f1", ""), tags.get("test_accuracy", ""),
                      tags.get("new_site_accuracy", ""), tags.get("data_hash", "")[:8], tags.get("git_commit", "")[:8],
                      tags.get("gate", "")[:60])
    Console().print(table)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
):
    """Serve the champion over HTTP (BentoML): web page at /ui/, API docs at /docs, hot swap on promote."""
    import shutil

    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml is None:
        _fail("bentoml is not installed in this environment")
    console.print(f"serving models:/{get_settings().registry.registered_model}@{get_settings().serving.alias} "
                  f"on http://{host}:{port}/ (web page /ui/, API docs /docs)")
    os.execv(bentoml, [bentoml, "serve", "hematovision.api.service:HematoVision", "--host", host, "--port", str(port)])


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results file: .csv or .json.")] = Path("predictions.csv"),
    model: Annotated[Optional[str], typer.Option(help="Model URI or saved classifier folder (default: the champion).")] = None,
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
        _fail(str(error))
    if not files:
        _fail("no image files found")
    stores.registry(settings)  # MLflow pointed at the configured store, for models:/ URIs
    uri = model or f"models:/{settings.registry.registered_model}@{settings.serving.alias}"
    try:
        classifier = load_classifier(uri)
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for a missing model
        _fail(f"cannot load {uri}: {error}")
    with console_progress(logging_progress(cli_logger())) as report:
        rows = predict_files(classifier, files, settings.serving.review_threshold, progress=report)
    write_results(rows, out, classifier.classes)
    failed = sum(1 for r in rows if r.get("error"))
    review = sum(1 for r in rows if r.get("needs_review"))
    console.print(f"{len(rows)} images -> {out} ({review} need review, {failed} could not be read)")


@predictions_app.command("purge")
def predictions_purge(
    older_than_days: Annotated[Optional[float], typer.Option(help="Default: the retain_images_days setting.")] = None,
):
    """Delete retained request images older than the retention period (patient privacy)."""
    settings = get_settings()
    log = stores.prediction_log(settings)
    if older_than_days is not None:
        removed = log.purge_images(older_than_days)
    else:
        removed = log.purge_images(settings.serving.retain_images_days, settings.serving.review_image_days)
    console.print(f"removed {removed} retained image(s)")


def _accounts():
    return stores.accounts(get_settings())


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="Sign-in name (lower-case letters, digits, . _ -).")],
    role: Annotated[list[str], typer.Option("--role", "-r", help="pathologist, engineer, ops or admin (repeat for several).")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input (scripts).")] = False,
):
    """Create an account; the password is asked for (never given on the command line)."""

    password = sys.stdin.readline().rstrip("\n") if password_stdin else typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        user = _accounts().add_user(username, password, role)
    except AccountError as error:
        _fail(str(error))
    console.print(f"added {user.username} ({', '.join(sorted(user.roles))})")


@users_app.command("list")
def users_list():
    """Accounts, their roles and whether they are disabled."""
    table = Table("user", "roles", "disabled", "created")
    for user in _accounts().list_users():
        table.add_row(user["username"], ", ".join(user["roles"]), "yes" if user["disabled"] else "", user["created_at"][:19])
    Console().print(table)


@users_app.command("disable")
def users_disable(username: Annotated[str, typer.Argument()]):
    """Disable an account: its sessions and API tokens stop working at once."""
    try:
        _accounts().disable_user(username)
    except AccountError as error:
        _fail(str(error))
    console.print(f"disabled {username}")


@users_app.command("token")
def users_token(
    username: Annotated[str, typer.Argument()],
    name: Annotated[str, typer.Option(help="What the token is for (e.g. the LIS bridge).")] = "api",
):
    """Create an API token for a system acting as USERNAME; printed once, only its hash is kept."""
    try:
        token = _accounts().create_token(username, name)
    except AccountError as error:
        _fail(str(error))
    print(token)


@feedback_app.command("export")
def feedback_export():
    """Write the corrected images as a new DVC-tracked dataset version (class folders); nothing new, no change."""
    result = export_corrections(get_settings())
    console.print(f"{result['images']} corrected images ({result['added']} new, {result['removed']} removed, "
                  f"{result['disputed']} disputed left out) -> {result['path']} (DVC {result['dvc_file']}, md5 {result['md5']})")


# --- retraining on the corrections, and the demo (one block: `monitor` is added elsewhere) ---------
@app.command()
def retrain(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    promote: Annotated[bool, typer.Option(help="Promote the challenger if the gate passes.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only.")] = False,
):
    """Retrain on raw data + the pathologists' corrections; promote only if it wins on the new site's
    held-out corrections without losing on TEST. Exit 1 when the gate refuses."""
    _params(params_file, profile)  # fail fast on a bad profile, before Prefect is even imported
    from flows.retraining import retraining_flow

    with progress.console_progress() as report:
        progress.current = report
        try:
            summary = retraining_flow(profile=profile, params_file=str(params_file), promote=promote)
        except RetrainError as error:
            _fail(str(error))
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
    table = Table("", "champion (parent)", "challenger", title=f"Retraining: v{summary['version']} vs v{summary['parent_version']}")
    for key, label in (("holdout_accuracy", "new-site holdout accuracy"), ("holdout_macro_f1", "new-site holdout macro-F1"),
                       ("test_accuracy", "TEST accuracy"), ("test_macro_f1", "TEST macro-F1")):
        if key in summary["challenger"]:
            table.add_row(label, f"{summary['champion'][key]:.4f}", f"{summary['challenger'][key]:.4f}")
    c = summary["corrections"]
    table.add_row("corrections", f"{c['exported']} exported ({c['added']} new)", f"{c['train']} trained on, {c['holdout']} held out")
    table.add_row("lineage", f"data {summary['data_hash'][:8]}, corrections {summary['corrections_hash'][:8]}",
                  f"parent v{summary['parent_version']}, mode {summary['mode']}")
    table.add_row("wall time", "", ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items()))
    Console().print(table)
    verdict = "[green]PROMOTED[/]" if summary["promoted"] else "[yellow]NOT promoted[/]"
    Console().print(f"{verdict} v{summary['version']}: " + "; ".join(summary["gate"]["reasons"]))


@app.command()
def demo(
    profile: ProfileOption = None,
    params_file: ParamsOption = Path("params.yaml"),
    test_images: Annotated[int, typer.Option(help="Official TEST images streamed through /predict (no drift expected).")] = 200,
    new_site_images: Annotated[int, typer.Option(help="New-site (pbc-sample) images streamed, of which --corrections are corrected.")] = 600,
    corrections: Annotated[int, typer.Option(help="New-site predictions the simulated pathologist corrects.")] = 400,
    eval_images: Annotated[int, typer.Option(help="New-site images never corrected, scored before and after.")] = 200,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service to answer with the new version.")] = 180.0,
):
    """The whole story: champion, service, traffic, drift check, corrections, retraining, hot swap."""
    _params(params_file, profile)
    config = DemoConfig(profile=profile, params_file=str(params_file), test_images=test_images,
                        new_site_images=new_site_images, corrections=corrections, eval_images=eval_images,
                        swap_timeout_s=timeout)
    result = run_demo(get_settings(), config, say=lambda m: Console().print(m))
    if not result["swapped"]:
        raise typer.Exit(1)
# --- drift monitoring (monitoring.py, flows/monitoring.py) ------------------------------------------
monitor_app = typer.Typer(help="Drift monitoring of the champion's predictions (Evidently).", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("run")
def monitor_run(
    act: Annotated[bool, typer.Option(help="Start retraining that an alert calls for (per retrain_trigger).")] = True,
):
    """Check new windows of the prediction log for drift now, raise alerts; prints the status."""
    from flows.monitoring import monitoring_flow

    try:
        result = monitoring_flow(act=act)
    except MonitoringError as error:
        _fail(str(error))
    status = result["status"]
    for w in result["windows"]:
        drifted = [name for name, s in w["signals"].items() if s["drift"]]
        console.print(f"window {w['id']}: {w['n']} predictions {w['start_at'][:19]} .. {w['end_at'][:19]}: "
                      + ("[red]DRIFTING[/] (" + ", ".join(drifted) + ")" if w["drifting"] else "no drift"))
    for alert in result["alerts"]:
        console.print(f"[yellow]alert {alert['id']}[/] ({alert['status']}): {alert['message']}")
    console.print(f"model v{status['model_version']}: " + (f"[red]drifting[/] since {status['since']} ({', '.join(status['signals'])})"
                  if status["drifting"] else "no drift") + f"; {len(result['windows'])} new window(s); "
                  f"corrections since this champion: {status['corrections']['since_champion']}")
    print(json.dumps({k: status[k] for k in ("drifting", "since", "signals", "model_version", "drift_windows")}))


@monitor_app.command("ui")
def monitor_ui(
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
):
    """Open the Evidently UI on the monitoring workspace (127.0.0.1 only; telemetry off)."""
    import shutil

    settings = get_settings()
    workspace_project(settings)  # the project and its dashboard exist before the first window
    evidently = shutil.which("evidently", path=str(Path(sys.executable).parent)) or shutil.which("evidently")
    if evidently is None:
        _fail("evidently is not installed in this environment")
    workspace = str(settings.path(settings.monitoring.workspace))
    console.print(f"Evidently UI on http://127.0.0.1:{port}/ (workspace {workspace})")
    os.execv(evidently, [evidently, "ui", "--workspace", workspace, "--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    app()
