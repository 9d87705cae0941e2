"""Turn an opened Pillow image into the 8-bit RGB image a user would expect to see, by one rule.

The rule, by what the file holds:

- **orientation**: the EXIF Orientation (1 to 8) is applied with :func:`PIL.ImageOps.exif_transpose`,
  so the pixels are the way every viewer shows them (a camera JPEG tagged "rotate 90" is
  turned upright).  Pillow turns TIFFs upright itself while loading them.
- **high bit depth**: single-band 16-bit and 32-bit integer or float images (modes ``I;16``,
  ``I;16B``, ``I;16L``, ``I;16N``, ``I``, ``F``) are stretched per image: the 2nd percentile
  becomes 0, the 98th 255, values between are mapped linearly and rounded, values outside are
  clipped; the grey result fills R, G and B.  An image whose 2nd and 98th percentiles are equal
  (a constant one, say) becomes 0 where it is at most that value and 255 above.  Float images
  holding NaN or infinite values are refused: they mark no-data that has no grey to map to.
  Why: remote-sensing sensors store 10 to 14 significant bits in 16-bit files, or reflectances as
  floats, so no fixed scale fits them all.  Full-range scaling (divide by 65535) turns a 12-bit
  scene (0..4095) nearly black and Pillow's own ``convert("RGB")`` clips it to white; a per-image
  2 %-98 % stretch is what remote-sensing viewers show (QGIS's default cumulative cut, torchgeo's
  plotting), and it also ignores a few saturated or dead pixels.  The cost: absolute brightness
  between images is not kept, which a scene classifier does not need.
- **more than 8 bits per band in several bands** (16-bit RGB, RGBA or grey+alpha PNGs and TIFFs):
  refused.  Pillow reads only the top 8 bits of each band, which silently blackens 12-bit data,
  and gives no way to reach the rest; export such files as 8-bit RGB.
- **transparency** (``LA``, ``PA``, ``RGBA``, palette or colour-key transparency): composited on
  black, ``round(colour * alpha / 255)``: a transparent pixel, usually no-data outside a scene's
  footprint, becomes black whatever colour the file hides under it; an opaque one is kept.
  Premultiplied modes (``La``, ``RGBa``) already are that, so their colour bands are taken as they are.
- **everything else** Pillow converts itself with ``convert("RGB")``: ``1`` (black and white),
  ``L`` (grey), palette ``P`` (expanded), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``.  A mode
  it cannot convert is refused in one line naming the file and the mode.

Refusals are :class:`kdbench.errors.UserError`, one line naming the file and the mode and saying
what to do.  Images Pillow cannot open at all (TIFFs with 5 or more bands, float RGB TIFFs) never
reach :func:`to_rgb`; :func:`unopenable` says why for those it can describe.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin

from kdbench.errors import UserError

STRETCH_PERCENTILES = (2.0, 98.0)  # per-image stretch of high-bit-depth images: these become 0 and 255
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})  # single band, over 8 bits
PREMULTIPLIED_MODES = frozenset({"La", "RGBa"})  # colour already multiplied by alpha: composited on black
EXPORT_RGB = "export it as 8-bit RGB (JPEG, PNG or TIFF)"

_WIDE_RAWMODE = re.compile(r";16[BLN]$")  # how Pillow names 16 bits per band it will cut to 8 ("RGB;16B", "LA;16B")
_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "float"}


def to_rgb(img: Image.Image, source: str | os.PathLike) -> Image.Image:
    """``img`` (opened, not yet loaded) as an ``RGB`` image by the module's rule; ``source`` names it in errors.

    Open the file from a file object, not a path: Pillow maps an uncompressed TIFF opened by name
    into memory with its upright size before turning it upright, which scrambles TIFFs whose
    orientation is 5 to 8.
    """
    _refuse_cut_bands(img, source)
    img = ImageOps.exif_transpose(img)  # loads it; a copy, turned when the EXIF says so
    mode = img.mode
    if mode in HIGH_DEPTH_MODES:
        grey = _stretch(np.asarray(img), source, mode)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in PREMULTIPLIED_MODES:
        colour = np.asarray(img)[:, :, :-1]
        return Image.fromarray(np.ascontiguousarray(colour if mode == "RGBa" else np.repeat(colour, 3, axis=2)))
    if img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        composited = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255  # round(colour * alpha / 255), on black
        return Image.fromarray(composited.astype(np.uint8))
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise UserError(f"{source}: image mode {mode} cannot be converted to RGB ({err}); {EXPORT_RGB}") from err


def unopenable(path: str | os.PathLike) -> str | None:
    """Why Pillow cannot open the TIFF at ``path`` (its bands and sample type) and what to do; None if not such a TIFF."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head if head[2:4] in (b"+\0", b"\0+") else head[:8])
            f.seek(ifd.next)
            ifd.load(f)
        bands = int(ifd.get(277, 1))
        bits = sorted(set(ifd.get(258, (1,))))
        kind = _SAMPLE_FORMATS.get(max(ifd.get(339, (1,))), "unknown")
    except Exception:  # not a TIFF, or too damaged to describe: the caller keeps Pillow's own error
        return None
    depth = "/".join(str(b) for b in bits)
    return (
        f"{path}: a TIFF with {bands} band(s) of {depth}-bit {kind} samples, which Pillow cannot open; "
        f"{EXPORT_RGB}, with the 3 bands to show"
    )


def _refuse_cut_bands(img: Image.Image, source: str | os.PathLike) -> None:
    """Refuse an image of several bands stored with more than 8 bits each, which Pillow would cut to their top 8 bits."""
    if img.mode in HIGH_DEPTH_MODES:
        return
    args = [t.args for t in getattr(img, "tile", ())]  # a rawmode, or a tuple that starts with one (most formats)
    rawmodes = [a if isinstance(a, str) else a[0] if isinstance(a, tuple) and a else None for a in args]
    wide = [r for r in rawmodes if isinstance(r, str) and _WIDE_RAWMODE.search(r)]
    tiff_bits = img.tag_v2.get(258, ()) if isinstance(img, TiffImagePlugin.TiffImageFile) else ()
    if wide or max(tiff_bits, default=0) > 8:
        stored = wide[0] if wide else "/".join(str(b) for b in tiff_bits) + " bits per band"
        raise UserError(
            f"{source}: image mode {img.mode} is stored with more than 8 bits per band ({stored}), of which Pillow reads "
            f"only the top 8 (12-bit data would turn nearly black); {EXPORT_RGB}"
        )


def _stretch(values: np.ndarray, source: str | os.PathLike, mode: str) -> np.ndarray:
    """Grey uint8 of one high-bit-depth band: its 2nd percentile to 0, its 98th to 255, linear between, clipped."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise UserError(
            f"{source}: image mode {mode} holds NaN or infinite values (no-data?); "
            f"replace them with a number (e.g. 0) or {EXPORT_RGB}"
        )
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if hi <= lo:  # at least 96 % of the pixels share one value: the stretch's limit, a step at that value
        return np.where(values > lo, 255, 0).astype(np.uint8)
    return np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
