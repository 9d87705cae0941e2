"""Every image mode Pillow opens becomes the RGB uint8 image a user expects, or a one-line refusal naming file and mode.

Expected pixels are computed here in numpy from the arrays the images were made of, not with
:mod:`kdbench.data.pixels`'s helpers.
"""

from __future__ import annotations

import colorsys
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from kdbench.data.decode import decode_image, load_images
from kdbench.data.pixels import to_rgb
from kdbench.errors import UserError

RNG = np.random.default_rng(21)
H, W = 24, 36  # not square: a wrong rotation cannot pass


def decoded(path: Path) -> np.ndarray:
    """The file's pixels by the rule, opened from a file object as :func:`decode_image` does."""
    with open(path, "rb") as f, Image.open(f) as img:
        out = np.asarray(to_rgb(img, path))
    assert out.dtype == np.uint8 and out.shape[2] == 3
    return out


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


def stretched(values: np.ndarray) -> np.ndarray:
    """2nd percentile to 0, 98th to 255, linear, clipped, rounded; grey in R, G and B."""
    v = values.astype(np.float64)
    lo, hi = np.percentile(v, [2, 98])
    return grey3(np.rint(np.clip((v - lo) / (hi - lo), 0, 1) * 255))


def on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.rint(colour.astype(np.float64) * alpha[:, :, None] / 255).astype(np.uint8)


def save(img: Image.Image, path: Path, mode: str, **params) -> Path:
    img.save(path, **params)
    with Image.open(path) as check:
        assert check.mode == mode, f"the test meant to write a {mode} file, Pillow opens a {check.mode} one"
    return path


# -- high bit depths: a per-image 2-98 % stretch --------------------------------------------------


def test_12_bit_tiff_is_stretched_not_white(tmp_path):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once
    path = save(Image.fromarray(ramp), tmp_path / "ramp.tif", "I;16")
    with Image.open(path) as img:
        old = np.asarray(img.convert("RGB"))  # what Pillow's own conversion gave: clipped, white from 255 up
    assert np.all(old[ramp >= 255] == 255)
    out = decoded(path)
    assert np.array_equal(out[:, :, 0], out[:, :, 2])
    grey = out[:, :, 0]
    # the 2nd and 98th percentiles of 0..4095 are 81.9 and 4013.1: at or below one is black, at or above the other white
    assert np.all(grey[ramp <= 81] == 0) and np.all(grey[ramp >= 4014] == 255)
    assert grey[ramp == 2048] == 128  # (2048 - 81.9) / 3931.2 * 255 = 127.5 + 0.03
    assert np.all(np.diff(grey.ravel().astype(int)) >= 0)  # monotone
    assert np.array_equal(out, stretched(ramp))


def test_12_bit_random_tiff(tmp_path):
    values = RNG.integers(0, 4096, (H, W), dtype=np.uint16)
    assert np.array_equal(decoded(save(Image.fromarray(values), tmp_path / "a.tif", "I;16")), stretched(values))


def test_16_bit_big_endian_tiff(tmp_path):
    values = RNG.integers(100, 60000, (H, W)).astype(">u2")
    path = save(Image.fromarray(values), tmp_path / "big.tif", "I;16B")
    assert np.array_equal(decoded(path), stretched(values.astype(np.int64)))


@pytest.mark.parametrize("mode", ["I;16L", "I;16N"])
def test_other_16_bit_modes(mode):
    values = RNG.integers(0, 1024, (H, W)).astype("<u2" if mode == "I;16L" else "=u2")
    img = Image.frombytes(mode, (W, H), values.tobytes())
    assert np.array_equal(np.asarray(to_rgb(img, "mem")), stretched(values))


def test_32_bit_integer_tiff(tmp_path):
    values = RNG.integers(-50_000, 3_000_000, (H, W)).astype(np.int32)
    path = save(Image.fromarray(values), tmp_path / "i32.tif", "I")
    assert np.array_equal(decoded(path), stretched(values))


def test_float_tiff(tmp_path):
    reflectance = RNG.uniform(0.0, 0.3, (H, W)).astype(np.float32)
    reflectance[0, :3] = [5.0, -1.0, 40.0]  # outliers are clipped, they do not squash the rest
    path = save(Image.fromarray(reflectance), tmp_path / "f.tif", "F")
    out = decoded(path)
    assert np.array_equal(out, stretched(reflectance))
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0 and out[5:, :, 0].std() > 40


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_tiff_with_nan_or_inf_is_refused(tmp_path, bad):
    values = RNG.uniform(0, 1, (H, W)).astype(np.float32)
    values[3, 4] = bad
    path = save(Image.fromarray(values), tmp_path / "nodata.tif", "F")
    with pytest.raises(UserError) as err:
        decoded(path)
    message = str(err.value)
    assert "\n" not in message and "nodata.tif" in message and "mode F" in message and "NaN or infinite" in message


def test_constant_and_nearly_constant_16_bit(tmp_path):
    flat = np.full((H, W), 3000, dtype=np.uint16)
    assert np.all(decoded(save(Image.fromarray(flat), tmp_path / "flat.tif", "I;16")) == 0)
    spots = flat.copy()
    spots[0, :5] = 3500  # 5 of 864 pixels: both percentiles are 3000, the bright spots become white
    out = decoded(save(Image.fromarray(spots), tmp_path / "spots.tif", "I;16"))
    assert np.array_equal(out, grey3(np.where(spots > 3000, 255, 0)))


# -- 8-bit modes ----------------------------------------------------------------------------------


def test_bilevel_png(tmp_path):
    bits = RNG.random((H, W)) > 0.5
    assert np.array_equal(decoded(save(Image.fromarray(bits), tmp_path / "b.png", "1")), grey3(bits * 255))


def test_grey_png(tmp_path):
    grey = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    assert np.array_equal(decoded(save(Image.fromarray(grey), tmp_path / "l.png", "L")), grey3(grey))


def test_grey_alpha_png_is_composited_on_black(tmp_path):
    la = RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)
    la[0, 0, 1], la[0, 1, 1] = 0, 255
    out = decoded(save(Image.fromarray(la), tmp_path / "la.png", "LA"))
    assert np.array_equal(out, on_black(np.repeat(la[:, :, :1], 3, axis=2), la[:, :, 1]))
    assert np.all(out[0, 0] == 0) and np.all(out[0, 1] == la[0, 1, 0])


def test_rgba_png_is_composited_on_black(tmp_path):
    rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[:, : W // 2, 3] = 255  # opaque half: kept as it is
    rgba[0, -1] = [250, 10, 200, 0]  # a hidden colour under full transparency: black
    out = decoded(save(Image.fromarray(rgba), tmp_path / "rgba.png", "RGBA"))
    assert np.array_equal(out, on_black(rgba[:, :, :3], rgba[:, :, 3]))
    assert np.array_equal(out[:, : W // 2], rgba[:, : W // 2, :3]) and np.all(out[0, -1] == 0)


def test_rgb_png_with_colour_key_is_composited_on_black(tmp_path):
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[2, 2] = [1, 2, 3]
    out = decoded(save(Image.fromarray(rgb), tmp_path / "key.png", "RGB", transparency=(1, 2, 3)))
    keyed = np.all(rgb == [1, 2, 3], axis=2)
    assert np.all(out[keyed] == 0) and np.array_equal(out[~keyed], rgb[~keyed])


def _palette_image(mode: str = "P") -> tuple[Image.Image, np.ndarray, np.ndarray]:
    index = RNG.integers(0, 8, (H, W), dtype=np.uint8)
    palette = RNG.integers(0, 256, (8, 3), dtype=np.uint8)
    img = Image.frombytes("P", (W, H), index.tobytes())
    img.putpalette(palette.ravel().tolist())
    return img, index, palette


def test_palette_png_with_transparent_index(tmp_path):
    img, index, palette = _palette_image()
    out = decoded(save(img, tmp_path / "p.png", "P", transparency=3))
    assert np.array_equal(out, np.where((index == 3)[:, :, None], 0, palette[index]).astype(np.uint8))
    assert (index == 3).any()


def test_palette_png_with_alpha_per_index(tmp_path):
    img, index, palette = _palette_image()
    alpha = np.array([255, 0, 128, 255, 64, 255, 1, 200], dtype=np.uint8)
    out = decoded(save(img, tmp_path / "pa.png", "P", transparency=alpha.tobytes()))
    assert np.array_equal(out, on_black(palette[index], alpha[index]))


def test_palette_without_transparency_is_expanded(tmp_path):
    img, index, palette = _palette_image()
    assert np.array_equal(decoded(save(img, tmp_path / "plain.png", "P")), palette[index])


def test_palette_alpha_mode():
    _, index, palette = _palette_image()
    alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    img = Image.frombytes("PA", (W, H), np.stack([index, alpha], axis=2).tobytes())
    img.putpalette(palette.ravel().tolist())
    assert np.array_equal(np.asarray(to_rgb(img, "mem")), on_black(palette[index], alpha))


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_modes_keep_their_colour_bands(mode):
    bands = RNG.integers(0, 256, (H, W, len(mode)), dtype=np.uint8)
    img = Image.frombytes(mode, (W, H), bands.tobytes())
    colour = bands[:, :, :3] if mode == "RGBa" else np.repeat(bands[:, :, :1], 3, axis=2)
    assert np.array_equal(np.asarray(to_rgb(img, "mem")), colour)


def test_rgbx_drops_its_padding():
    bands = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.frombytes("RGBX", (W, H), bands.tobytes()), "mem")), bands[:, :, :3])


def test_cmyk_tiff(tmp_path):
    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    path = save(Image.frombytes("CMYK", (W, H), cmyk.tobytes()), tmp_path / "cmyk.tif", "CMYK")
    ink = cmyk.astype(np.float64) / 255
    expected = 255 * (1 - ink[:, :, :3]) * (1 - ink[:, :, 3:])  # subtractive, without a colour profile
    assert np.abs(decoded(path).astype(np.float64) - expected).max() <= 1


def test_ycbcr():
    ycc = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    y, cb, cr = (ycc[:, :, i].astype(np.float64) for i in range(3))
    expected = np.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], axis=2
    )  # JPEG's full-range BT.601
    out = np.asarray(to_rgb(Image.frombytes("YCbCr", (W, H), ycc.tobytes()), "mem")).astype(np.float64)
    assert np.abs(out - np.clip(expected, 0, 255)).max() <= 2


def test_hsv():
    hsv = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = np.asarray(to_rgb(Image.frombytes("HSV", (5, 6), hsv.tobytes()), "mem")).astype(np.float64)
    expected = np.array([[colorsys.hsv_to_rgb(*(p / 255)) for p in row] for row in hsv]) * 255
    assert np.abs(out - expected).max() <= 1.5


def test_lab_neutral_greys_stay_grey():
    lightness = np.linspace(0, 255, W).astype(np.uint8)
    neutral = np.zeros((H, W))  # Pillow stores a* and b* as signed bytes: 0 is neither green-red nor blue-yellow
    lab = np.stack([np.tile(lightness, (H, 1)), neutral, neutral], axis=2).astype(np.uint8)
    out = np.asarray(to_rgb(Image.frombytes("LAB", (W, H), lab.tobytes()), "mem")).astype(int)
    assert np.abs(out[:, :, 0] - out[:, :, 1]).max() <= 2 and np.abs(out[:, :, 2] - out[:, :, 1]).max() <= 2
    assert out[0, 0, 1] <= 2 and out[0, -1, 1] >= 253 and np.all(np.diff(out[0, :, 1]) >= 0)


# -- orientation ----------------------------------------------------------------------------------

UPRIGHT = {  # EXIF Orientation -> how the stored pixels are turned to be shown upright, in numpy
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_png(tmp_path, orientation):
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = save(Image.fromarray(rgb), tmp_path / "o.png", "RGB", exif=_exif(orientation))
    assert np.array_equal(decoded(path), UPRIGHT[orientation](rgb))


def test_exif_orientation_6_jpeg_is_turned_upright(tmp_path):
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[:8, :12] = [255, 0, 0]  # a red block top left
    path = save(Image.fromarray(rgb), tmp_path / "phone.jpg", "RGB", exif=_exif(6), quality=95)
    with Image.open(path) as img:
        stored = np.asarray(img.convert("RGB"))  # the unturned decode, as the old code gave it
    out = decoded(path)
    assert out.shape == (W, H, 3) and np.array_equal(out, np.rot90(stored, -1))
    assert out[:12, -8:, 0].mean() > 200 and out[-12:, :8, 0].mean() < 50  # the 8 x 12 red block, turned, is top right


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_tiff_orientation_6_through_decode_image(tmp_path, mode):
    values = RNG.integers(0, 256 if mode == "L" else 4096, (H, W)).astype(np.uint8 if mode == "L" else np.uint16)
    path = save(Image.fromarray(values), tmp_path / "o.tif", mode, tiffinfo={0x0112: 6})
    upright = np.rot90(values, -1)
    expected = grey3(upright) if mode == "L" else stretched(upright)
    out = decode_image(path, H)  # upright W x H, resized to H x H
    resized = Image.fromarray(expected).resize((H, H), Image.BILINEAR)
    assert out.shape == (3, H, H) and np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(resized))


# -- refusals -------------------------------------------------------------------------------------


def _png_16_bit_rgb(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit-per-band RGB PNG (Pillow cannot write one)."""
    h, w = rgb.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def _tiff(path: Path, bands: np.ndarray) -> Path:
    """An uncompressed little-endian TIFF of ``bands`` ([H, W, C] uint8, any C; Pillow cannot write 5 bands)."""
    h, w, c = bands.shape
    photometric = 2 if c == 3 else 1  # RGB, else grey plus extra bands
    tags = [(256, w), (257, h), (258, None), (259, 1), (262, photometric), (273, None), (277, c), (278, h), (279, bands.size)]
    tags.append((284, 1))
    ifd_size = 2 + 12 * len(tags) + 4
    bits_at, data_at = 8 + ifd_size, 8 + ifd_size + 2 * c
    out = b"II*\0" + struct.pack("<IH", 8, len(tags))
    for tag, value in tags:
        if tag == 258:
            out += struct.pack("<HHII", tag, 3, c, bits_at)
        elif tag in (273, 279):
            out += struct.pack("<HHII", tag, 4, 1, data_at if tag == 273 else value)
        else:
            out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    path.write_bytes(out + struct.pack("<I", 0) + struct.pack(f"<{c}H", *[8] * c) + bands.tobytes())
    return path


def test_16_bit_per_band_rgb_is_refused(tmp_path):
    path = _png_16_bit_rgb(tmp_path / "rgb16.png", RNG.integers(0, 4096, (H, W, 3)))
    with pytest.raises(UserError) as err:
        decoded(path)
    message = str(err.value)
    assert "\n" not in message and "rgb16.png" in message and "mode RGB" in message and "export it as 8-bit RGB" in message


def test_five_band_tiff_is_refused_naming_its_bands(tmp_path):
    path = _tiff(tmp_path / "five.tif", RNG.integers(0, 256, (H, W, 5), dtype=np.uint8))
    with pytest.raises(UserError, match=r"five\.tif: a TIFF with 5 band\(s\) of 8-bit unsigned integer .*export it as 8-bit RGB"):
        decode_image(path, 16)
    assert decode_image(_tiff(tmp_path / "three.tif", np.zeros((H, W, 3), np.uint8)), 16).shape == (3, 16, 16)


def test_refusal_reaches_the_unreadable_images_error(tmp_path):
    folder = make_image_folder(tmp_path / "set", classes=2, per_class=3)
    _png_16_bit_rgb(folder / "class1" / "img000.png", RNG.integers(0, 4096, (H, W, 3)))
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    with pytest.raises(UserError) as err:
        load_images(folder, paths, 16)
    message = str(err.value)
    assert "\n" not in message and "1 unreadable image" in message and "class1/img000.png" in message
    assert "mode RGB" in message and "export it as 8-bit RGB" in message
    images, bad = load_images(folder, paths, 16, skip_bad=True)
    assert images.shape == (5, 3, 16, 16) and bad[0]["path"] == "class1/img000.png"


# -- end to end -----------------------------------------------------------------------------------


def test_decode_image_gives_3_by_r_by_r_uint8_for_every_kind(tmp_path):
    img, _, _ = _palette_image()
    files = [
        save(Image.fromarray(RNG.integers(0, 4096, (H, W), dtype=np.uint16)), tmp_path / "i16.tif", "I;16"),
        save(Image.fromarray(RNG.integers(0, 9999, (H, W)).astype(">u2")), tmp_path / "i16b.tif", "I;16B"),
        save(Image.fromarray(RNG.integers(-9, 99999, (H, W)).astype(np.int32)), tmp_path / "i32.tif", "I"),
        save(Image.fromarray(RNG.random((H, W)).astype(np.float32)), tmp_path / "f.tif", "F"),
        save(Image.fromarray(RNG.random((H, W)) > 0.5), tmp_path / "b.png", "1"),
        save(Image.fromarray(RNG.integers(0, 256, (H, W), dtype=np.uint8)), tmp_path / "l.png", "L"),
        save(Image.fromarray(RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)), tmp_path / "la.png", "LA"),
        save(Image.fromarray(RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)), tmp_path / "rgba.png", "RGBA"),
        save(img, tmp_path / "p.png", "P", transparency=0),
        save(Image.frombytes("CMYK", (W, H), RNG.bytes(H * W * 4)), tmp_path / "c.jpg", "CMYK"),
        save(Image.fromarray(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)), tmp_path / "o.jpg", "RGB", exif=_exif(6)),
    ]
    for path in files:
        for resolution in (16, 40):
            out = decode_image(path, resolution)
            assert out.shape == (3, resolution, resolution) and out.dtype == torch.uint8, path.name
            expected = Image.fromarray(decoded(path)).resize((resolution, resolution), Image.BILINEAR)
            assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(expected)), path.name
