"""``hematovision db``: the schema of the stores' database (lab database, prediction log,
monitoring state), migrated with Alembic; see docs/database.md.

Stores also migrate on first use, so the embedded mode needs none of this; in lab mode run
``hematovision db upgrade`` once per release, before the replicas of the new version start. In lab
mode it also carries the images this host kept in folders (``serving.images_dir``,
``lab.corrections_images_dir``: before lab mode, or by a version that kept them there) into the
database, where every host reads them; run it on each host that has such folders.
"""

from __future__ import annotations

import typer

from hematovision import database, migrations, stores
from hematovision.cli.common import console, fail
from hematovision.image_store import DatabaseImageStore
from hematovision.settings import Settings, get_settings

db_app = typer.Typer(
    help="The stores' database (lab mode: the PostgreSQL of HEMATOVISION_DATABASE_URL; else the sqlite files).",
    no_args_is_help=True,
)


def _targets(settings: Settings) -> list[tuple[str, database.Database]]:
    files = {
        "lab": settings.lab.lab_db,
        "predictions": settings.serving.predictions_db,
        "monitoring": settings.monitoring.state_db,
    }
    return [(store, database.get(stores.database(settings, files[store]))) for store in migrations.STORES]


@db_app.command("upgrade")
def db_upgrade():
    """Migrate every store's tables to this version's schema (a database made by an earlier version
    is upgraded in place; nothing is lost). Safe to run again, and from several hosts at once."""
    try:
        for store, target in _targets(get_settings()):
            before, after = migrations.upgrade(target, store)
            change = "up to date" if before == after else f"{before or 'empty'} -> {after}"
            console.print(f"{store}: {change} ({target.name})")
        _carry_folder_images(get_settings())
    except database.DatabaseUnavailable as error:
        fail(str(error))


def _carry_folder_images(settings: Settings) -> None:
    """Lab mode: move this host's image folders into the database (each file deleted once its row
    is committed; a file whose bytes do not match its name stays, and is reported)."""
    for what, store in (
        ("prediction images", stores.prediction_log(settings)),
        ("corrected images", stores.corrections(settings)),
    ):
        if not isinstance(store.images, DatabaseImageStore) or store.images_dir is None:
            continue  # sqlite: the folder is the store
        carried = store.images.take_folder(store.images_dir)
        if carried["images"] or carried["left"]:
            console.print(
                f"{what}: {carried['images']} carried from {store.images_dir} into the database "
                f"({carried['bytes'] / 1e6:.1f} MB)"
                + (f"; {carried['left']} files left there (bytes do not match their name)" if carried["left"] else "")
            )


@db_app.command("status")
def db_status():
    """Each store's schema revision against the one this version expects; exit 1 if any is behind."""
    behind = []
    try:
        for store, target in _targets(get_settings()):
            current, head = migrations.current(target, store), migrations.head(store)
            console.print(f"{store}: {current or 'empty'} (this version: {head}) ({target.name})")
            if current != head:
                behind.append(store)
    except database.DatabaseUnavailable as error:
        fail(str(error))
    if behind:
        fail(f"not migrated: {', '.join(behind)} (run `hematovision db upgrade`)")
