"""nanoalign.image.open_image, the one image opener: every PIL mode converted as transformers converts it (its
processors' convert_to_rgb, and load_image where the two agree), EXIF orientation as a setting, the pixel limit."""
import io

import numpy as np
import pytest
from PIL import Image

from nanoalign.image import ImageError, image_size, open_image

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

RNG = np.random.default_rng(0)


def _modes(tmp_path):
    """name -> (path, has_transparency) for one small file per mode users' data holds."""
    h, w = 7, 11
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent pixels: where black-flattening and white-compositing differ most
    gray = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    out = {}

    def save(name, im, fmt="PNG", transparent=False, **kw):
        p = tmp_path / f"{name}.{fmt.lower()}"
        im.save(p, format=fmt, **kw)
        out[name] = (str(p), transparent)

    save("rgb", Image.fromarray(rgb))
    save("rgba", Image.fromarray(np.dstack([rgb, alpha])), transparent=True)
    save("la", Image.fromarray(np.dstack([gray, alpha]), mode="LA"), transparent=True)
    save("l", Image.fromarray(gray))
    save("1", Image.fromarray(gray > 128))
    pal = Image.fromarray(rgb).quantize(16)
    save("p", pal)
    save("p_transparency", pal, transparent=True, transparency=3)
    save("l_transparency", Image.fromarray(gray), transparent=True, transparency=int(gray[1, 1]))
    save("rgb_transparency", Image.fromarray(rgb), transparent=True, transparency=tuple(int(c) for c in rgb[2, 2]))
    save("i16", Image.fromarray(RNG.integers(0, 65536, (h, w), dtype=np.uint16)))
    save("cmyk", Image.fromarray(np.dstack([rgb, gray]), mode="CMYK"), fmt="JPEG")
    save("jpeg_l", Image.fromarray(gray), fmt="JPEG")
    return out


def test_every_mode_as_transformers(tmp_path):
    modes = _modes(tmp_path)
    for name, (path, transparent) in modes.items():
        ours = np.asarray(open_image(path))
        assert ours.dtype == np.uint8 and ours.shape[2] == 3, name
        with Image.open(path) as im:
            im.load()
            expected = convert_to_rgb(im, return_numpy=True)  # what transformers' processors feed the model
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        if not transparent:  # load_image (exif_transpose + convert("RGB")) agrees where there is no transparency
            np.testing.assert_array_equal(ours, np.asarray(load_image(path)), err_msg=name)
        with open(path, "rb") as f:  # bytes and PIL images open the same way as paths
            np.testing.assert_array_equal(np.asarray(open_image(f.read())), expected, err_msg=name)
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(open_image(im)), expected, err_msg=name)
        assert image_size(path) == ours.shape[:2], name
    # the kind of fault: transparent pixels are white (composited), not black (alpha dropped)
    rgba = np.asarray(open_image(modes["rgba"][0]))
    assert (rgba[0] == 255).all()


def _exif_jpeg(path, orientation):
    im = Image.fromarray(RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_setting(tmp_path, monkeypatch, orientation):
    p = str(tmp_path / "o.jpg")
    _exif_jpeg(p, orientation)
    with Image.open(p) as im:
        stored = np.asarray(im.convert("RGB"))  # LLaVA's Image.open(f).convert('RGB')
    upright = np.asarray(load_image(p))  # transformers rotates by the tag
    assert stored.shape != upright.shape or not np.array_equal(stored, upright)
    np.testing.assert_array_equal(np.asarray(open_image(p)), stored)  # default: stored orientation
    np.testing.assert_array_equal(np.asarray(open_image(p, exif_transpose=True)), upright)
    assert image_size(p) == stored.shape[:2] and image_size(p, exif_transpose=True) == upright.shape[:2]
    monkeypatch.setenv("NANOALIGN_EXIF_TRANSPOSE", "1")  # the documented setting reaches every entry point
    np.testing.assert_array_equal(np.asarray(open_image(p)), upright)
    monkeypatch.setenv("NANOALIGN_EXIF_TRANSPOSE", "maybe")
    with pytest.raises(ValueError, match="NANOALIGN_EXIF_TRANSPOSE"):
        open_image(p)


def test_bad_files_have_reasons(tmp_path):
    with pytest.raises(ImageError) as e:
        open_image(str(tmp_path / "nope.png"))
    assert e.value.reason == "missing_image"
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError) as e:
        open_image(str(tmp_path / "junk.png"))
    assert e.value.reason == "unreadable_image" and "junk.png" in str(e.value)
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])  # header fine, pixels cut off
    with pytest.raises(ImageError) as e:
        open_image(str(tmp_path / "cut.png"))
    assert e.value.reason == "unreadable_image"


def test_pixel_limit_checked_before_decoding(tmp_path):
    # a 12000 x 12000 PNG of one colour is a few hundred KB on disk: refused from its header, not decoded
    p = tmp_path / "huge.png"
    Image.new("L", (12000, 12000), 7).save(p, optimize=True)
    assert p.stat().st_size < 1_000_000
    with pytest.raises(ImageError) as e:
        open_image(str(p))
    assert e.value.reason == "image_too_large" and "12000x12000" in str(e.value)
    with pytest.raises(ImageError):
        image_size(str(p))
    assert image_size(str(p), max_pixels=12000 * 12000) == (12000, 12000)
    small = tmp_path / "s.png"
    Image.new("RGB", (30, 20)).save(small)
    with pytest.raises(ImageError):
        open_image(str(small), max_pixels=599)
    assert open_image(str(small), max_pixels=600).size == (30, 20)
