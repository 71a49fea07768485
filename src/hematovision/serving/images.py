"""Request images: which bytes the service accepts, and what it makes of them before the model.

Every image goes through :func:`hematovision.data.imaging.load_rgb` (the training decode path) and
the training localiser, so the service, ``hematovision predict`` and the monitoring job see an
image exactly as training did. A refused image is an :class:`ImageRejected` with a stable code;
how that becomes an HTTP answer is the API's business (``api/errors.py``).
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from hematovision.data.imaging import ImageError, image_stats, load_rgb
from hematovision.data.localize import cell_in_view, locate_and_crop

# The formats a microscope camera or LIS export produces; anything else is refused before any
# decoder runs, which also keeps PIL's rarer (and less hardened) parsers away from request bytes.
ACCEPTED_FORMATS = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}
_OTHER_IMAGE_MAGIC = (b"GIF87a", b"GIF89a", b"RIFF", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP")


class ImageRejected(ValueError):
    """A request image (or image reference) the service refuses; ``code`` is stable."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.index = code, message, index

    def as_dict(self) -> dict[str, Any]:
        """The answer in place of a bad image's prediction (batch predictions go on without it)."""
        return {"error": self.code, "detail": self.message}


@dataclass(frozen=True)
class PreparedImage:
    rgb: Any  # PIL.Image.Image; None once the crop is made (the decoded picture is not kept)
    sha256: str
    stats: dict[str, float]
    crop: np.ndarray | None = None  # the white-cell crop, when the model's input size was known
    cell_in_view: str | None = None  # whole / cut / none (localize.cell_in_view), with the crop


def _accepted(data: bytes) -> bool:
    return any(data.startswith(m) for magics in ACCEPTED_FORMATS.values() for m in magics)


def prepare_image(data: bytes, crop_size: int | None = None) -> PreparedImage:
    """Check the format, decode with the training decoder, compute drift statistics and, given
    the model's input size, crop the white cell. The service crops here, on the request's own
    thread: localisation then runs in parallel across requests and overlaps the batched model
    call instead of queueing in front of it on the batcher's threads. With the crop made, the
    decoded picture is let go at once: a request holds the crops and statistics of its images
    until it is answered, not the pictures."""
    if data and not _accepted(data):
        if any(data.startswith(m) for m in _OTHER_IMAGE_MAGIC):
            raise ImageRejected("unsupported_format", f"accepted formats: {', '.join(ACCEPTED_FORMATS)}")
        raise ImageRejected("not_an_image", f"not a {'/'.join(ACCEPTED_FORMATS)} image")
    try:
        rgb = load_rgb(data)
    except ImageError as error:
        raise ImageRejected(error.code, error.message) from error
    stats = image_stats(rgb)
    if not crop_size:
        return PreparedImage(rgb, hashlib.sha256(data).hexdigest(), stats)
    pixels = np.asarray(rgb)
    del rgb
    crop, box = locate_and_crop(pixels, crop_size)
    del pixels
    return PreparedImage(None, hashlib.sha256(data).hexdigest(), stats, crop, cell_in_view(box))


def declared_pixels(data: bytes) -> int:
    """The pixels an image's header says it has (nothing is decoded); 0 for bytes that are no
    accepted image or whose header cannot be read (:func:`prepare_image` refuses those)."""
    if not data or not _accepted(data):
        return 0
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
            return int(im.width) * int(im.height)
    except Exception:  # noqa: BLE001 - any unreadable header: prepare_image gives the precise refusal
        return 0


def check_pixel_budget(images: Sequence[bytes], budget: int) -> None:
    """Refuse a request whose images together declare more than ``budget`` pixels, from their
    headers, before any of them is decoded: what one request may make the service hold."""
    total = 0
    for index, data in enumerate(images):
        total += declared_pixels(data)
        if total > budget:
            raise ImageRejected(
                "too_many_pixels",
                f"the images up to number {index + 1} of {len(images)} have {total} pixels together; "
                f"at most {budget} per request (send fewer or smaller images per request)",
            )


def needs_review(confidence: float, threshold: float, cell: str | None) -> bool:
    """A person should look: the model is unsure, or it found no white cell to classify (on TEST
    such answers are nearly all wrong, however confident)."""
    return confidence < threshold or cell == "none"


# --- patient images going out -------------------------------------------------------------------------

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "BMP": "image/bmp"}
_ORIENTATION = 0x0112
# JPEG segments kept: everything but APP1-APP15 (EXIF, XMP, ICC, IPTC, maker notes...) and comments,
# except Adobe's APP14, which says how the colour channels are coded (part of the pixels).
_JPEG_APP1, _JPEG_APP14, _JPEG_APP15, _JPEG_COM, _JPEG_SOS = 0xE1, 0xEE, 0xEF, 0xFE, 0xDA
# PNG chunks kept: the critical ones (IHDR, PLTE, IDAT, IEND: upper-case first letter) and tRNS,
# which the decoder turns into pixels; text, time, EXIF, colour profiles and the rest are dropped.
_PNG_KEPT = {b"tRNS"}


def strip_metadata(data: bytes) -> tuple[bytes, str]:
    """A kept request image as it may leave the service: the same pixels, without the metadata a
    camera or an export wrote with them (EXIF with its thumbnails, XMP, comments, text chunks,
    embedded profiles; a TIFF keeps only the tags its pixels need), and its media type. Only the
    EXIF orientation survives (a TIFF's is applied to its pixels), so that it still shows the way
    the model saw it. JPEG and PNG
    are cut at the segment level (their compressed pixel data is copied byte for byte), TIFF is
    re-encoded losslessly, BMP has no metadata to strip."""
    with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
        fmt = im.format or ""
        orientation = _orientation_of(im)
        if fmt == "JPEG":
            out = _strip_jpeg(data, orientation)
        elif fmt == "PNG":
            out = _strip_png(data, orientation)
        elif fmt == "TIFF":  # PIL applies a TIFF's orientation as it reads it: the copy is upright
            im.load()
            buffer = io.BytesIO()
            im.copy().save(buffer, "TIFF", compression="tiff_lzw")  # a plain image: none of the tags
            out = buffer.getvalue()
        else:
            out = data
    return out, MEDIA_TYPES.get(fmt, "application/octet-stream")


def _orientation_of(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: as load_rgb, show it unrotated
        return 1
    return value if 1 <= value <= 8 else 1


def _minimal_exif(orientation: int) -> bytes:
    """An EXIF block (with its ``Exif\\0\\0`` prefix) holding only the orientation."""
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif.tobytes()


def _strip_jpeg(data: bytes, orientation: int) -> bytes:
    out = bytearray(data[:2])  # SOI
    if orientation != 1:
        payload = _minimal_exif(orientation)
        out += bytes([0xFF, _JPEG_APP1]) + (len(payload) + 2).to_bytes(2, "big") + payload
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            out += data[i : i + 2]
            i += 2
            continue
        if marker == _JPEG_SOS:  # the scans: compressed pixels (and their tables) up to the last EOI
            end = data.rfind(b"\xff\xd9")
            out += data[i : end + 2 if end > i else len(data)]
            return bytes(out)
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i : i + 2 + length]
        adobe = marker == _JPEG_APP14 and segment[4:9] == b"Adobe"
        if not (_JPEG_APP1 <= marker <= _JPEG_APP15 or marker == _JPEG_COM) or adobe:
            out += segment
        i += 2 + length
    raise ValueError("JPEG without image data")


def _strip_png(data: bytes, orientation: int) -> bytes:
    out = bytearray(data[:8])  # signature
    i = 8
    while i + 8 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        chunk = data[i : i + 12 + length]
        if kind[:1].isupper() or kind in _PNG_KEPT:
            out += chunk
        if kind == b"IHDR" and orientation != 1:
            payload = _minimal_exif(orientation)[6:]  # PNG's eXIf holds the block without the prefix
            out += len(payload).to_bytes(4, "big") + b"eXIf" + payload
            out += zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
        i += 12 + length
        if kind == b"IEND":
            return bytes(out)
    raise ValueError("PNG without an IEND chunk")
