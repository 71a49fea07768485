"""The one image-decoding path shared by training and serving.

Everything that turns bytes into pixels goes through :func:`load_rgb`, so a file that the
training pipeline accepts is decoded exactly as the service would decode it, and a file one of
them rejects is rejected by both with the same machine-readable :attr:`ImageError.code`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 40 MP is ~8x a full 640x480 smear field squared away; far above any microscope frame we expect,
# far below what would hurt a 2-core serving box (an RGB copy is 120 MB).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
_PNG_IEND = b"IEND"
_PNG_IDAT = b"IDAT"


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image; ``code`` is stable, ``message`` is for humans.

    Codes: empty, unreadable, too_large, not_an_image, decompression_bomb, too_small, animated,
    truncated, corrupt, unsupported_mode.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _read_bytes(source: bytes | bytearray | memoryview | str | Path, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > max_bytes:  # refuse before reading a huge file into memory
                raise ImageError("too_large", f"file is {size} bytes, limit is {max_bytes}")
            data = path.read_bytes()
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"input is {len(data)} bytes, limit is {max_bytes}")
    return data


def _jpeg_is_complete(data: bytes) -> bool:
    """True when the last scan is followed by an end-of-image marker.

    Checked explicitly because PIL pads a truncated JPEG with grey whenever some other library has
    set the process-global ``ImageFile.LOAD_TRUNCATED_IMAGES``. Inside entropy-coded data every
    0xFF byte is stuffed, so FFD9 cannot occur there: an EOI after the last SOS means the image
    data was not cut short.
    """
    return data.rfind(_JPEG_EOI) > data.rfind(_JPEG_SOS) >= 0


def _png_is_complete(data: bytes) -> bool:
    """True when an IEND chunk follows the last IDAT chunk (same reason as for JPEG)."""
    return data.rfind(_PNG_IEND) > data.rfind(_PNG_IDAT) >= 0


def _high_bit_depth_to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float greyscale to 0..255 by its nominal range.

    PIL's own ``convert("L")`` clips I;16 at 255 (a near-white image), so we scale explicitly.
    Nominal range rather than min-max stretch, so that brightness stays meaningful for drift
    monitoring.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0
    else:  # "I" (int32) or "F" (float32)
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("unsupported_mode", f"mode {im.mode} with non-finite values")
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo < 0:
            raise ImageError("unsupported_mode", f"mode {im.mode} with negative values")
        if im.mode == "F" and hi <= 1.0:
            scaled = arr * 255.0
        elif hi <= 255:
            scaled = arr
        elif hi <= 65535:
            scaled = arr / 257.0
        else:
            raise ImageError("unsupported_mode", f"mode {im.mode} with values up to {hi:.0f}")
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_8bit(im)
    if mode == "P":
        # Palette images may carry transparency in a tRNS chunk / GIF transparency index.
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    elif mode in ("1", "L", "CMYK", "YCbCr"):
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas are shown on white, the way a viewer would show them to a person.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_mode", f"cannot convert mode {im.mode} to RGB") from exc


def load_rgb(
    source: bytes | str | Path,
    *,
    min_side: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode ``source`` (raw bytes or a path) into a fully loaded RGB image, or raise ImageError.

    Size and frame checks use the header only, so a decompression bomb is refused before any
    pixel is decoded. EXIF orientation is applied; alpha is composited on white.
    """
    data = _read_bytes(source, max_bytes)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own hard limit tripped while opening
        raise ImageError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # A recognised format whose header is damaged.
        raise ImageError("corrupt", f"cannot parse image header: {exc}") from exc

    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                "decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds limit {max_pixels}"
            )
        if min(width, height) < min_side:
            raise ImageError("too_small", f"{width}x{height} is smaller than {min_side} px on a side")
        try:
            n_frames = getattr(im, "n_frames", 1)
        except (OSError, EOFError, ValueError) as exc:
            raise ImageError("truncated", f"cannot count frames: {exc}") from exc
        if n_frames > 1:
            raise ImageError("animated", f"{n_frames} frames; send a single still image")
        if im.format == "JPEG" and not _jpeg_is_complete(data):
            raise ImageError("truncated", "JPEG data ends before the end-of-image marker")
        if im.format == "PNG" and not _png_is_complete(data):
            raise ImageError("truncated", "PNG data ends before the IEND chunk")
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("decompression_bomb", str(exc)) from exc
        except (OSError, EOFError, SyntaxError, ValueError, IndexError) as exc:
            msg = str(exc)
            code = "truncated" if "truncated" in msg or isinstance(exc, EOFError) else "corrupt"
            raise ImageError(code, f"cannot decode pixels: {msg}") from exc
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not reject a decodable image
            oriented = im
        rgb = _to_rgb(oriented if oriented is not None else im)
        if rgb is im:
            rgb = im.copy()  # detach from the file object closed by ``with``
    return rgb


def image_stats(rgb: Image.Image | np.ndarray) -> dict[str, float]:
    """Cheap per-image statistics for drift monitoring.

    Colour statistics are on a thumbnail of at most 128 px and sharpness (variance of the
    4-neighbour Laplacian of the grey image) on at most 512 px, so the cost is bounded for any
    input size; sharpness therefore compares like with like only for similar input sizes.
    """
    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    width, height = im.size

    small = im.copy()
    small.thumbnail((128, 128), Image.Resampling.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    arr = np.asarray(small, dtype=np.float32)
    hue = hsv[..., 0] * 2 * np.pi
    sat = hsv[..., 1]
    # Hue is an angle: a circular mean weighted by saturation, so grey pixels don't vote.
    wsum = float(sat.sum())
    if wsum > 1e-6:
        ang = np.arctan2((np.sin(hue) * sat).sum(), (np.cos(hue) * sat).sum())
        mean_hue = float(np.degrees(ang) % 360.0)
    else:
        mean_hue = 0.0

    mid = im.copy()
    mid.thumbnail((512, 512), Image.Resampling.BILINEAR)
    grey = np.asarray(mid.convert("L"), dtype=np.float32)
    if min(grey.shape) >= 3:
        lap = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
        sharpness = float(lap.var())
    else:
        sharpness = 0.0

    luma = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return {
        "width": int(width),
        "height": int(height),
        "brightness": float(luma.mean() / 255.0),
        "saturation": float(sat.mean()),
        "hue": mean_hue,
        "sharpness": sharpness,
        # Rotation wedges in the training data are black; a shift in this share is a framing change.
        "dark_fraction": float((luma < 20).mean()),
    }
