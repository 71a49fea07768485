"""Image decoding, WBC localisation, dataset scanning/validation/splitting, on real images."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from hematovision import CLASSES
from hematovision.data.dataset import grouped_split, prepare, scan_class_folders, scan_kaggle, validate_images
from hematovision.data.imaging import ImageError, image_stats, load_rgb
from hematovision.data.localize import WbcBox, crop_box, crop_wbc, locate_wbc

DATASETS = (Path(__file__).parents[2] / "../shared/datasets").resolve()
KAGGLE = DATASETS / "blood-cells"
KAGGLE_IMAGES = KAGGLE / "dataset2-master" / "images"
PBC = DATASETS / "pbc-sample"

needs_data = pytest.mark.skipif(not KAGGLE_IMAGES.is_dir() or not PBC.is_dir(), reason="shared datasets not mounted")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height but whose pixel data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _noise_rgb(w: int = 120, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _kaggle_files(split: str, cls: str, n_groups: int, per_group: int = 1) -> list[Path]:
    """The first ``per_group`` files of the first ``n_groups`` cells (by k) of a split/class."""
    by_k: dict[int, list[Path]] = {}
    for f in sorted((KAGGLE_IMAGES / split / cls.upper()).glob("*.jpeg")):
        by_k.setdefault(int(f.stem.split("_")[1]), []).append(f)
    return [f for k in sorted(by_k)[:n_groups] for f in by_k[k][:per_group]]


def _real_images() -> list[Path]:
    files = []
    for cls in CLASSES:
        files += _kaggle_files("TRAIN", cls, 2) + _kaggle_files("TEST", cls, 1)
        files += sorted((PBC / cls).glob("*.jpg"))[:3]
    return files


# --------------------------------------------------------------------------------------- imaging


@pytest.mark.parametrize(
    ("name", "make", "code"),
    [
        ("text", lambda: b"this is not an image\n" * 20, "not_an_image"),
        ("zero_bytes", lambda: b"", "empty"),
        ("truncated_jpeg", lambda: (d := _encode(_noise_rgb(), "JPEG"))[: len(d) // 2], "truncated"),
        ("truncated_png", lambda: (d := _encode(_noise_rgb(), "PNG"))[: len(d) // 2], "truncated"),
        ("one_pixel", lambda: _encode(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        ("bomb_50000", lambda: _png_header_only(50_000, 50_000), "decompression_bomb"),
        (
            "animated_gif",
            lambda: _encode(
                Image.new("RGB", (64, 64), "red"),
                "GIF",
                save_all=True,
                append_images=[Image.new("RGB", (64, 64), "blue")],
            ),
            "animated",
        ),
    ],
)
def test_load_rgb_rejects_bad_files(tmp_path: Path, name: str, make, code: str) -> None:
    data = make()
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        with pytest.raises(ImageError) as info:
            load_rgb(source)
        assert info.value.code == code
        assert info.value.message


def test_bomb_refused_from_header_before_decoding() -> None:
    # 8000x8000 is under PIL's own warning limit and its pixel data is a few bytes: decoding it
    # would fail as truncated, so "decompression_bomb" proves the header check came first.
    with pytest.raises(ImageError) as info:
        load_rgb(_png_header_only(8000, 8000), max_pixels=1_000_000)
    assert info.value.code == "decompression_bomb"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncation_detected_even_if_pil_is_told_to_pad(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    # Some libraries flip this process-global flag, after which PIL pads truncated files with grey.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _encode(_noise_rgb(), fmt)
    with pytest.raises(ImageError) as info:
        load_rgb(data[: len(data) * 2 // 3])
    assert info.value.code == "truncated"


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_rgb(tmp_path / "nope.jpg")
    assert info.value.code == "unreadable"


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 257 * 100, 40000, 65535]] * 40, dtype=np.uint16).repeat(10, axis=1)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    rgb = np.asarray(load_rgb(_encode(im, "PNG")))
    assert rgb.shape == (40, 40, 3)
    assert rgb[0, ::10, 0].tolist() == [0, 100, 156, 255]


@pytest.mark.parametrize(
    ("im", "fmt", "expected"),
    [
        (Image.new("CMYK", (48, 48), (0, 255, 0, 0)), "JPEG", (255, 0, 255)),
        (Image.new("RGB", (48, 48), (200, 30, 90)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", (200, 30, 90)),
        (Image.new("RGBA", (48, 48), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (48, 48), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("LA", (48, 48), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("L", (48, 48), 77), "PNG", (77, 77, 77)),
    ],
    ids=["cmyk_jpeg", "palette_png", "rgba_transparent", "rgba_opaque", "la_transparent", "grey"],
)
def test_load_rgb_converts(im: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    out = load_rgb(_encode(im, fmt))
    assert out.mode == "RGB"
    centre = np.asarray(out)[24, 24].astype(int)
    assert np.abs(centre - np.array(expected)).max() <= 3  # JPEG rounding


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (80, 40), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    out = load_rgb(_encode(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (40, 80)


@needs_data
def test_real_image_bytes_and_path_agree_and_stats() -> None:
    path = _kaggle_files("TRAIN", "monocyte", 1)[0]
    a = load_rgb(path)
    b = load_rgb(path.read_bytes())
    assert a.size == (320, 240) and np.array_equal(np.asarray(a), np.asarray(b))
    stats = image_stats(a)
    assert {"width", "height", "brightness", "saturation", "hue", "sharpness"} <= stats.keys()
    assert (stats["width"], stats["height"]) == (320, 240)
    assert 0.3 < stats["brightness"] < 0.95 and 0 < stats["saturation"] < 1 and 0 <= stats["hue"] < 360
    assert stats["sharpness"] > 0
    assert stats["sharpness"] > image_stats(a.resize((80, 60)).resize((320, 240)))["sharpness"]


# ----------------------------------------------------------------------------------- localisation


def _purple(a: np.ndarray) -> np.ndarray:
    """Nucleus-coloured pixels by an HSV rule independent of the localiser's own blue-green rule."""
    hsv = np.asarray(Image.fromarray(a).convert("HSV"), dtype=np.float32)
    hue, sat, val = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    return (hue > 220) & (hue < 300) & (sat > 0.3) & (val > 0.15)


@needs_data
@pytest.mark.parametrize(
    "path",
    _real_images() if KAGGLE_IMAGES.is_dir() and PBC.is_dir() else [],
    ids=lambda p: f"{p.parent.parent.name}-{p.parent.name}-{p.name}",
)
def test_locate_wbc_finds_the_nucleus_on_both_sites(path: Path) -> None:
    a = np.asarray(load_rgb(path))
    box = locate_wbc(a)
    assert box.found and 0 < box.nucleus_fraction < 0.5
    h, w = a.shape[:2]
    assert 0.3 * min(h, w) <= box.side <= min(h, w)
    # The centre third of the crop must be mostly nucleus stain, far more than same-sized windows
    # at random positions of the same frame.
    inner = box.side / 3
    centre = _purple(crop_box(a, WbcBox(box.cx, box.cy, inner, True, 0))).mean()
    rng = np.random.default_rng(0)
    rand = np.mean(
        [
            _purple(
                crop_box(
                    a,
                    WbcBox(
                        rng.uniform(inner / 2, w - inner / 2), rng.uniform(inner / 2, h - inner / 2), inner, True, 0
                    ),
                )
            ).mean()
            for _ in range(16)
        ]
    )
    assert centre > 0.3 and centre > 1.5 * rand, (centre, rand)
    crop = crop_wbc(a, 96)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
    assert _purple(crop).mean() > 0.05


def _synthetic_smear(cx: int, cy: int) -> np.ndarray:
    """Pink/grey smear with a black rotation wedge, red cells, a platelet and a purple nucleus."""
    h, w = 240, 320
    yy, xx = np.mgrid[:h, :w]
    a = np.full((h, w, 3), (215, 205, 200), np.uint8)
    for rx, ry in [(40, 60), (120, 200), (260, 180), (200, 40)]:
        a[(xx - rx) ** 2 + (yy - ry) ** 2 < 22**2] = (205, 150, 150)  # red cells
    a[(xx - 60) ** 2 + (yy - 200) ** 2 < 3**2] = (120, 80, 200)  # platelet: purple but tiny
    a[yy > 0.4 * xx + 200] = 0  # wedge
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < 25**2] = (230, 200, 230)  # cytoplasm
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < 17**2] = (130, 90, 210)  # nucleus
    return a


def test_locate_wbc_on_synthetic_smear_ignores_wedge_and_platelet() -> None:
    a = _synthetic_smear(230, 110)
    box = locate_wbc(a)
    assert box.found
    assert abs(box.cx - 230) <= 4 and abs(box.cy - 110) <= 4
    assert 34 * 1.2 <= box.side <= 34 * 2.5
    # Same answer from a PIL image, and crops are square uint8 even where the box leaves the frame.
    assert locate_wbc(Image.fromarray(a)) == box
    edge = _synthetic_smear(310, 10)
    assert crop_wbc(edge, 64).shape == (64, 64, 3)


def test_locate_wbc_says_when_the_nucleus_is_cut_by_the_frame_or_a_wedge() -> None:
    assert not locate_wbc(_synthetic_smear(230, 110)).at_edge
    assert locate_wbc(_synthetic_smear(310, 10)).at_edge  # in the frame's corner
    cut = _synthetic_smear(230, 110)
    cut[:, 240:] = 0  # a black rotation wedge across the nucleus, far from the frame's border
    assert locate_wbc(cut).at_edge


def test_locate_wbc_falls_back_to_centre_crop() -> None:
    blank = np.full((240, 320, 3), (215, 205, 200), np.uint8)
    box = locate_wbc(blank)
    assert not box.found and (box.cx, box.cy, box.side) == (160, 120, 240)
    assert crop_wbc(blank, 32).shape == (32, 32, 3)


# --------------------------------------------------------------------------------------- dataset


@needs_data
def test_scan_kaggle_groups_match_the_known_cell_counts() -> None:
    df = scan_kaggle(KAGGLE)
    assert len(df) == 12_515
    assert set(df["split"]) == {"train", "test", "test_simple"}
    assert set(df["label"]) == set(CLASSES)
    train_cells = df[df["split"] == "train"].groupby("label")["group"].nunique().to_dict()
    assert train_cells == {"eosinophil": 75, "lymphocyte": 27, "monocyte": 16, "neutrophil": 159}
    assert df["group"].str.fullmatch(r"(TRAIN|TEST|TEST_SIMPLE)/[A-Z]+/\d+").all()
    assert (KAGGLE / df["path"].iloc[0]).is_file()


@needs_data
def test_grouped_split_keeps_cells_whole_and_every_class_in_val() -> None:
    df = scan_kaggle(KAGGLE)
    split = grouped_split(df, val_fraction=0.2, seed=7)
    train_rows = df[df["split"] == "train"]
    assert split.index.equals(train_rows.index) and set(split) == {"train", "val"}
    sides = train_rows.assign(side=split).groupby("group")["side"].nunique()
    assert (sides == 1).all(), "a cell is on both sides of the split"
    val = train_rows[split == "val"]
    val_cells = val.groupby("label")["group"].nunique()
    assert set(val_cells.index) == set(CLASSES) and (val_cells >= 2).all()
    assert 0.1 < len(val) / len(train_rows) < 0.3
    assert split.equals(grouped_split(df, val_fraction=0.2, seed=7))
    assert not split.equals(grouped_split(df, val_fraction=0.2, seed=8))


def test_grouped_split_tiny_class_still_validated() -> None:
    rows = [
        {"split": "train", "label": c, "group": f"{c}/{g}", "path": f"{c}/{g}/{i}"}
        for c, n in [("a", 3), ("b", 40)]
        for g in range(n)
        for i in range(4)
    ]
    df = pd.DataFrame(rows)
    split = grouped_split(df, val_fraction=0.1, seed=0)
    val_groups = df[split == "val"].groupby("label")["group"].nunique()
    assert val_groups["a"] == 2 and val_groups["b"] == 4
    with pytest.raises(ValueError):
        grouped_split(df[df["group"].isin(["a/0", "b/0", "b/1"])], val_fraction=0.2, seed=0)


def test_grouped_split_holds_out_a_share_of_images_not_of_groups() -> None:
    # Cells found by content vary in size: one holds 40% of the class, the others 2-8 pictures each.
    sizes = [160] + [2, 8] * 30
    rows = [
        {"split": "train", "label": "a", "group": f"a/{g}", "path": f"a/{g}/{i}"}
        for g, n in enumerate(sizes)
        for i in range(n)
    ]
    df = pd.DataFrame(rows)
    for seed in range(5):
        split = grouped_split(df, val_fraction=0.2, seed=seed)
        share = (split == "val").mean()
        assert 0.18 <= share <= 0.3, share
        assert (split[df["group"] == "a/0"] == "train").all()  # the big one would make val 40% or more


def test_scan_class_folders_case_insensitive_with_unknown_folders(tmp_path: Path) -> None:
    png = _encode(_noise_rgb(64, 64), "PNG")
    for folder, name in [
        ("EOSINOPHIL", "a.PNG"),
        ("Lymphocyte", "b.png"),
        ("monocyte", "c.Jpg"),
        ("monocyte/sub", "d.tif"),
    ]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(png)
    (tmp_path / "basophil").mkdir()
    (tmp_path / "basophil" / "x.png").write_bytes(png)
    (tmp_path / "monocyte" / "notes.txt").write_text("not an image")
    (tmp_path / "monocyte" / ".DS_Store").write_bytes(b"\0")
    df, unknown = scan_class_folders(tmp_path)
    assert unknown == ["basophil"]
    assert sorted(zip(df["path"], df["label"])) == [
        ("EOSINOPHIL/a.PNG", "eosinophil"),
        ("Lymphocyte/b.png", "lymphocyte"),
        ("monocyte/c.Jpg", "monocyte"),
        ("monocyte/sub/d.tif", "monocyte"),
    ]
    assert df["group"].is_unique


def test_validate_images_never_crashes_on_bad_files(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(_encode(_noise_rgb(64, 48), "PNG"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    df = pd.DataFrame({"path": ["good.png", "empty.jpg", "text.jpg", "missing.jpg"], "label": "monocyte"})
    ok, bad = validate_images(df, tmp_path)
    assert ok["path"].tolist() == ["good.png"] and ok[["width", "height"]].iloc[0].tolist() == [64, 48]
    assert dict(zip(bad["path"], bad["error_code"])) == {
        "empty.jpg": "empty",
        "text.jpg": "not_an_image",
        "missing.jpg": "unreadable",
    }


@needs_data
def test_prepare_on_a_kaggle_subset_reports_bad_images(tmp_path: Path) -> None:
    src = tmp_path / "download"
    for split, n_groups in [("TRAIN", 3), ("TEST", 1)]:
        for cls in CLASSES:
            for f in _kaggle_files(split, cls, n_groups, per_group=2):
                dest = src / f.relative_to(KAGGLE)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
    mono = src / "dataset2-master/images/TRAIN/MONOCYTE"
    data = sorted(mono.glob("*.jpeg"))[0].read_bytes()
    (mono / "_99_1.jpeg").write_bytes(data[: len(data) // 3])  # truncated
    (mono / "_98_1.jpeg").write_bytes(b"")  # zero bytes
    (mono / "odd-name.jpeg").write_bytes(data)  # unknown group naming

    out = tmp_path / "prepared"
    summary = prepare(src, out, val_fraction=0.3, seed=1)

    bad = pd.read_csv(out / "bad_images.csv")
    assert dict(zip(bad["path"].map(lambda p: Path(p).name), bad["error_code"])) == {
        "_99_1.jpeg": "truncated",
        "_98_1.jpeg": "empty",
    }
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == ["path", "split", "label", "group", "name_group", "width", "height"]
    assert manifest["group"].equals(manifest["name_group"])  # no embedding function: the names decide
    assert not manifest["path"].str.contains("_99_1|_98_1").any()
    assert all((src / p).is_file() for p in manifest["path"])
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest.loc[manifest["split"] == "val", "label"]) == set(CLASSES)
    train_val = manifest[manifest["split"].isin(["train", "val"])]
    assert (train_val.groupby("group")["split"].nunique() == 1).all()
    assert "TRAIN/MONOCYTE/file:odd-name" in set(manifest["group"])
    assert (manifest["width"] == 320).all() and (manifest["height"] == 240).all()

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["n_bad"] == 2
    assert summary["groups"]["test"] == {c: 1 for c in CLASSES}
    assert sum(summary["images"]["val"].values()) + sum(summary["images"]["train"].values()) == len(train_val)


def test_prepare_writes_empty_bad_report_for_clean_class_folders(tmp_path: Path) -> None:
    src = tmp_path / "site"
    for cls in CLASSES:
        (src / cls.upper()).mkdir(parents=True)
        for i in range(3):
            (src / cls.upper() / f"{i}.png").write_bytes(_encode(_noise_rgb(40 + i, 40), "PNG"))
    summary = prepare(src, tmp_path / "out", val_fraction=0.3, seed=0)
    bad = pd.read_csv(tmp_path / "out" / "bad_images.csv")
    assert bad.empty and list(bad.columns) == ["path", "split", "label", "group", "error_code", "error_message"]
    assert summary["n_bad"] == 0 and summary["layout"] == "class_folders"
    assert set(summary["groups"]["val"]) == set(CLASSES)
