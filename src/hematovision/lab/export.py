"""``hematovision feedback export``: the corrections as a dataset version DVC pins.

The corrected images are written in the raw data's class-folder layout (``corrections/<class>/``)
and ``dvc add`` records the folder's content hash in ``corrections.dvc``, so that a retraining
run names exactly the set of corrections it used. Exporting again with nothing new rewrites
nothing and DVC keeps the same hash. An agreed image that cannot be read is left out and counted
(``unreadable``, with the images' hashes in ``unreadable_images``; in the log and the audit entry),
never fatal.
"""

from __future__ import annotations

from typing import Any

from hematovision import stores
from hematovision.data.dvc import dvc_data_hash, run_dvc
from hematovision.settings import Settings


def export_corrections(settings: Settings) -> dict[str, Any]:
    store = stores.corrections(settings)
    dest = settings.path(settings.paths.corrections_dataset_dir)
    result = store.export(dest)
    dvc_file = dest.with_name(dest.name + ".dvc")
    run_dvc("add", dest.name, cwd=dest.parent)
    store.audit(
        "cli",
        "feedback_export",
        str(dvc_file.name),
        {k: result[k] for k in ("images", "added", "removed", "disputed", "unreadable")},
    )
    return {**result, "path": str(dest), "dvc_file": str(dvc_file), "md5": dvc_data_hash(dvc_file)}
