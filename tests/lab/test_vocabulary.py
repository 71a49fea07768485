"""A laboratory's vocabulary: pathologists answer with types outside the model's classes, the
corrections keep and export them under their type, and enough of a type make it a class at the
next retraining. Real basophils and platelets from the second laboratory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hematovision import CLASSES, stores
from hematovision.lab.corrections import CorrectionError, Corrections
from hematovision.settings import get_settings
from hematovision.training.corrections_data import challenger_classes, corrections_rows

PBC = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def real(kind: str, n: int) -> list[bytes]:
    folder = PBC / "pbc-sample" / kind if (PBC / "pbc-sample" / kind).is_dir() else PBC / "pbc-other" / kind
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:n]]


def test_the_answerable_types_are_the_classes_then_the_vocabulary_never_unknown():
    settings = get_settings()
    lab = settings.lab.model_copy(update={"cell_types": ["Basophil", " band cell ", "unknown", "basophil", ""]})
    types = stores.answerable_types(settings.model_copy(update={"lab": lab}))
    assert types == (*CLASSES, "basophil", "band cell")
    assert "platelet" in stores.answerable_types(settings)  # the default vocabulary


def test_a_correction_outside_the_classes_is_stored_exported_and_counted_under_its_type(tmp_path):
    store = Corrections(tmp_path / "lab.sqlite", tmp_path / "images", stores.answerable_types(get_settings()))
    basophil, platelet = real("basophil", 1)[0], real("platelet", 1)[0]
    stored = store.submit("dr-a", "Basophil", basophil, {"label": "unknown", "model_version": "3"})
    assert stored["true_class"] == "basophil"
    store.submit("dr-a", "platelet", platelet, {"label": "neutrophil", "model_version": "3"})
    with pytest.raises(CorrectionError):
        store.submit("dr-a", "unknown", basophil)  # the model's answer, not a pathologist's
    with pytest.raises(CorrectionError):
        store.submit("dr-a", "dragon", basophil)

    exported = store.export(tmp_path / "export")
    assert exported["per_class"]["basophil"] == 1 and exported["per_class"]["platelet"] == 1
    assert len(list((tmp_path / "export" / "basophil").iterdir())) == 1

    confusion = store.stats()["confusion"]
    assert "unknown" in confusion["predicted"] and "basophil" in confusion["classes"]
    row = confusion["matrix"][confusion["predicted"].index("unknown")]
    assert row[confusion["classes"].index("basophil")] == 1
    assert len(confusion["matrix"]) == len(confusion["predicted"])

    rows = corrections_rows(tmp_path / "export", 0.0, stores.answerable_types(get_settings()))
    assert sorted(rows.label) == ["basophil", "platelet"]


def test_a_type_becomes_a_class_once_it_has_enough_agreed_corrections():
    corrections = pd.DataFrame({"label": ["basophil"] * 5 + ["platelet"] * 2 + ["neutrophil"] * 9})
    classes, waiting = challenger_classes(list(CLASSES), corrections, min_corrections=5)
    assert classes == [*CLASSES, "basophil"] and waiting == {"platelet": 2}
    classes, waiting = challenger_classes(list(CLASSES), corrections, min_corrections=6)
    assert classes == list(CLASSES) and waiting == {"basophil": 5, "platelet": 2}
    # a class the parent already has stays, in the parent's order
    classes, _ = challenger_classes([*CLASSES, "basophil"], corrections, min_corrections=100)
    assert classes == [*CLASSES, "basophil"]
