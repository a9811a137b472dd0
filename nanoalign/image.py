"""Image preprocessing for LLaVA-1.5 and LLaVA-1.6 (AnyRes), in PIL + numpy + torch (no torchvision).

LLaVA-1.5 ("llava"):  [pad to square with the CLIP mean colour (122, 116, 104)] -> resize the shortest side to
    `size` (PIL bicubic) -> center crop S x S -> x / 255 -> (x - mean) / std.          pixel_values (B, 3, S, S)
LLaVA-1.6 ("llava_next", AnyRes): pick the best pinpoint (h*, w*) from `image_grid_pinpoints` (largest effective
    resolution, then least waste), resize keeping the aspect ratio to fit (h*, w*), pad with black (centered) to
    exactly (h*, w*), cut into (h*/S) x (w*/S) tiles of S x S (row-major), and put the whole image squashed to S x S
    in front; every tile then goes through resize/crop/rescale/normalize.  pixel_values (B, n_max, 3, S, S), images
    with fewer tiles padded with zeros; image_sizes (B, 2) = (height, width) of the original image.

Numerics vs transformers 5.x: its `LlavaImageProcessor` / `LlavaNextImageProcessor` need torchvision (not installed
here); the PIL-backend variants `LlavaImageProcessorPil` / `LlavaNextImageProcessorPil` run, and they are what we
match. Both resize uint8 images with PIL bicubic (`Image.resize`, resample=3), pad/crop in uint8, rescale in float64
then cast to float32 and normalize in float32 -- the same operations in the same order as here, so the outputs are
bit-identical (max abs error 0.0, checked in tests/test_image.py over square/non-square images and several pinpoint
grids). Versus the torchvision ("fast") backend, which resizes float tensors with torch's antialiased bicubic,
differences of a few 1/255 steps (about 0.01-0.05 after normalization) are expected at edges; that backend cannot
be run here, so this number is not measured.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def read_image_processor_dict(path: str) -> tuple[dict | None, str | None]:
    """(image-processor settings, the file they came from) of a checkpoint folder, with transformers' priority:
    processor_config.json's "image_processor" section, else preprocessor_config.json; (None, None) when neither."""
    proc = os.path.join(path, PROCESSOR_FILE)
    if os.path.isfile(proc):
        d = _read_json(proc).get("image_processor")
        if d is not None:
            if not isinstance(d, dict):
                raise ValueError(f"{proc}: 'image_processor' is not a JSON object")
            return d, f"{proc} ('image_processor')"
    pre = os.path.join(path, PREPROCESSOR_FILE)
    if os.path.isfile(pre):
        return _read_json(pre), pre
    return None, None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cfg_get(cfg, *path, default=None):
    """Read cfg.a.b (dataclass/object) or cfg["a"]["b"] (dict); `default` when any step is missing or None."""
    cur = cfg
    for key in path:
        if cur is None:
            return default
        cur = cur.get(key) if isinstance(cur, dict) else getattr(cur, key, None)
    return default if cur is None else cur


def select_best_resolution(image_size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """AnyRes pinpoint choice. image_size and pinpoints are (height, width).

    For each (h*, w*): scale = min(w*/w, h*/h); effective = min(int(w*scale) * int(h*scale), w*h);
    wasted = h*w* - effective. Keep the largest effective, ties broken by the smallest waste (first one wins).
    """
    h, w = image_size
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    return best


def _fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after resizing to fit inside target keeping the aspect ratio (ceil, clamped)."""
    h, w = image_size
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def unpadded_bounds(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Rows/cols [r0, r1) x [c0, c1) of a grid_h x grid_w AnyRes feature map that cover the (height, width) image, not
    its black padding -- the same rounding as LLaVA-NeXT's unpad_image: the padded side shrinks by
    2 * ((current - round(original * scale)) // 2)."""
    h, w = image_size
    if w / h > grid_w / grid_h:  # wider than the grid: padding rows top and bottom
        new_h = int(round(h * (grid_w / w), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(w * (grid_h / h), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def unpadded_grid(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int]:
    """(rows, cols) of the AnyRes feature grid left after unpadding (see unpadded_bounds)."""
    r0, r1, c0, c1 = unpadded_bounds(image_size, grid_h, grid_w)
    return r1 - r0, c1 - c0


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


@dataclass
class ImageProcessor:
    model_type: str = "llava"                  # "llava" (1.5) | "llava_next" (1.6 AnyRes)
    size: dict = field(default_factory=lambda: {"shortest_edge": 336})  # or {"height": h, "width": w}
    crop_size: int = 336                       # S: side of every square fed to the vision tower
    patch_size: int = 14                       # vision tower patch (for token counts)
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_grid_pinpoints: list | None = None   # [[h, w], ...] for llava_next
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3                          # PIL.Image.BICUBIC
    pad_to_square: bool = True                 # llava only: LLaVA-1.5's expand2square with the mean colour
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if self.model_type not in ("llava", "llava_next"):
            raise ValueError(f"ImageProcessor: model_type {self.model_type!r} is not 'llava' or 'llava_next'")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"ImageProcessor: vision_feature_select_strategy "
                             f"{self.vision_feature_select_strategy!r} is not 'default' or 'full'")
        if self.model_type == "llava_next":
            if not self.image_grid_pinpoints:
                raise ValueError("ImageProcessor: llava_next needs image_grid_pinpoints")
            for p in self.image_grid_pinpoints:
                if len(p) != 2 or p[0] % self.crop_size or p[1] % self.crop_size:
                    raise ValueError(f"ImageProcessor: image_grid_pinpoints entry {p} is not a multiple of "
                                     f"crop_size {self.crop_size}")
            self.image_grid_pinpoints = [[int(a), int(b)] for a, b in self.image_grid_pinpoints]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("ImageProcessor: image_mean and image_std need 3 values")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_dict(cls, d: dict, model_config=None, source: str = PREPROCESSOR_FILE, log=print) -> "ImageProcessor":
        """From an image-processor settings dict as transformers stores it (CLIPImageProcessor,
        LlavaImageProcessor or LlavaNextImageProcessor; older CLIPFeatureExtractor files with `feature_extractor_type`
        and integer `size` / `crop_size`). A key the dict lacks takes the default of the class it names, as
        transformers does (CLIP / Llava: no square padding; LlavaNext: its pinpoint grid), except `size` and
        `crop_size`, which take the vision tower's image_size (the class's 224 cannot feed a 336 tower); each such
        fallback is printed in one line naming `source`. The model config (LlavaConfig or config.json dict), when
        given, decides model_type, patch_size and the select strategy."""
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        kind = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
        model_type = _cfg_get(model_config, "model_type") or d.get("model_type") or (
            "llava_next" if "LlavaNext" in kind or d.get("image_grid_pinpoints") else "llava")
        if model_type not in ("llava", "llava_next"):
            raise ValueError(f"{source}: model_type {model_type!r} is not 'llava' or 'llava_next'")
        fallbacks = []

        def get(key, default, why=None):
            if d.get(key) is not None:
                return d[key]
            fallbacks.append(f"{key}={default!r}" + (f" ({why})" if why else ""))
            return default

        side = _cfg_get(model_config, "vision_config", "image_size", default=336)
        crop = get("crop_size", side, "the vision tower's image_size")
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"{source}: crop_size {crop} is not square")
            crop = crop["height"]
        if not _is_int(crop) or crop < 1:
            raise ValueError(f"{source}: crop_size {crop!r}: expected an integer >= 1 (or a square height/width)")
        size = get("size", {"shortest_edge": side}, "the vision tower's image_size")
        if isinstance(size, (int, float)):
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or not (size.get("shortest_edge") or {"height", "width"} <= set(size)):
            raise ValueError(f"{source}: size {size!r} needs 'shortest_edge' or 'height' and 'width'")
        pins = d.get("image_grid_pinpoints") or _cfg_get(model_config, "image_grid_pinpoints")
        if model_type == "llava_next" and not pins:
            pins = get("image_grid_pinpoints", [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
        # transformers' LlavaImageProcessor and CLIPImageProcessor default to no square padding (do_pad False/None);
        # LlavaNext's do_pad pads the AnyRes canvas, which we always do.
        # CLIPImageProcessor has no padding setting at all.
        pad = (False if kind.startswith("CLIP") else bool(get("do_pad", False))) if model_type == "llava" else True
        ip = cls(
            model_type=model_type,
            size={k: int(v) for k, v in size.items() if v is not None},
            crop_size=int(crop),
            patch_size=int(_cfg_get(model_config, "vision_config", "patch_size", default=d.get("patch_size", 14))),
            vision_feature_select_strategy=_cfg_get(model_config, "vision_feature_select_strategy",
                                                    default=d.get("vision_feature_select_strategy", "default")),
            image_grid_pinpoints=pins,
            image_mean=tuple(get("image_mean", CLIP_MEAN)),
            image_std=tuple(get("image_std", CLIP_STD)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            resample=int(get("resample", 3)),
            pad_to_square=pad,
            do_resize=bool(get("do_resize", True)),
            do_center_crop=bool(get("do_center_crop", True)),
            do_rescale=bool(get("do_rescale", True)),
            do_normalize=bool(get("do_normalize", True)),
        )
        if fallbacks and log is not None:
            log(f"{source}: {kind or 'image processor'} settings not in the file, defaults used: "
                f"{', '.join(fallbacks)}")
        return ip

    @classmethod
    def from_model_config(cls, model_config, log=None, source="config.json") -> "ImageProcessor":
        """Defaults for a model with no image-processor settings at all (original LLaVA checkpoints, which take the
        CLIP tower's): S = vision image_size; LLaVA-1.5 pads to square unless config.json's `image_aspect_ratio`
        says otherwise (LLaVA's own setting; "pad" is LLaVA-1.5's)."""
        s = int(_cfg_get(model_config, "vision_config", "image_size", default=336))
        pad = _cfg_get(model_config, "image_aspect_ratio", default="pad") == "pad"
        ip = cls(
            model_type=_cfg_get(model_config, "model_type", default="llava"),
            size={"shortest_edge": s}, crop_size=s,
            patch_size=int(_cfg_get(model_config, "vision_config", "patch_size", default=14)),
            vision_feature_select_strategy=_cfg_get(model_config, "vision_feature_select_strategy", default="default"),
            image_grid_pinpoints=_cfg_get(model_config, "image_grid_pinpoints"),
            pad_to_square=pad)
        if log is not None:
            log(f"{source}: no image-processor settings ({PROCESSOR_FILE} 'image_processor' or {PREPROCESSOR_FILE}); "
                f"defaults used: size=crop_size={s}, CLIP mean/std, bicubic, pad_to_square={pad}")
        return ip

    @classmethod
    def from_pretrained(cls, path: str, model_config=None, log=print) -> "ImageProcessor":
        """The image-processor settings of a checkpoint folder, looked up where transformers looks: the
        "image_processor" section of processor_config.json (what transformers 5 writes) first, else
        preprocessor_config.json (older layout), else defaults from the model config (the argument, or
        `path`/config.json). Every fallback to a default is printed as one line through `log` (None: silent)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"ImageProcessor.from_pretrained: {path}: no such directory")
        if model_config is None and os.path.isfile(os.path.join(path, "config.json")):
            model_config = _read_json(os.path.join(path, "config.json"))
        d, source = read_image_processor_dict(path)
        if d is not None:
            return cls.from_dict(d, model_config, source, log)
        if model_config is None:
            raise FileNotFoundError(f"{path}: none of {PROCESSOR_FILE}, {PREPROCESSOR_FILE}, config.json found")
        return cls.from_model_config(model_config, log, os.path.join(path, "config.json"))

    def to_dict(self) -> dict:
        """A preprocessor_config.json that transformers' Llava(Next)ImageProcessor loads to the same behaviour."""
        nxt = self.model_type == "llava_next"
        d = {
            "image_processor_type": "LlavaNextImageProcessor" if nxt else "LlavaImageProcessor",
            "processor_class": "LlavaNextProcessor" if nxt else "LlavaProcessor",
            "do_convert_rgb": True,
            "do_resize": self.do_resize, "size": dict(self.size), "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_pad": True if nxt else self.pad_to_square,
        }
        if nxt:
            d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return d

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, PREPROCESSOR_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    # ------------------------------------------------------------------ token counts
    def num_image_tokens(self, height, width=None) -> int:
        """Image tokens one (height, width) image becomes (== the model's feature count for it).

        llava: (S/p)^2, +1 with `full` (CLS kept).
        llava_next: base (S/p)^2 (+1 `full`) + rows*cols of the unpadded tile grid + one image_newline per row,
        the grid being (h*/S * S/p) x (w*/S * S/p) for the chosen pinpoint (h*, w*) -- LlavaNextProcessor's count.
        Also accepts a single (height, width) tuple.
        """
        if width is None:
            height, width = height
        g = self.crop_size // self.patch_size
        base = g * g + (1 if self.vision_feature_select_strategy == "full" else 0)
        if self.model_type == "llava":
            return base
        bh, bw = select_best_resolution((height, width), self.image_grid_pinpoints)
        rows, cols = unpadded_grid((height, width), bh // self.crop_size * g, bw // self.crop_size * g)
        return base + rows * cols + rows

    def num_tiles(self, height: int, width: int) -> int:
        """Number of S x S crops (base + tiles) an image becomes (1 for llava)."""
        if self.model_type == "llava":
            return 1
        bh, bw = select_best_resolution((height, width), self.image_grid_pinpoints)
        return 1 + (bh // self.crop_size) * (bw // self.crop_size)

    # ------------------------------------------------------------------ processing
    def _resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if "shortest_edge" in self.size:
            s = self.size["shortest_edge"]
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            nh, nw = (new_long, s) if w <= h else (s, new_long)
        else:
            nh, nw = self.size["height"], self.size["width"]
        return img if (nw, nh) == (w, h) else img.resize((nw, nh), resample=self.resample)

    def _finish(self, img: Image.Image) -> np.ndarray:
        """resize -> center crop (zero-pad if too small) -> rescale -> normalize: (3, S, S) float32."""
        if self.do_resize:
            img = self._resize(img)
        x = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
        if self.do_center_crop:
            s = self.crop_size
            h, w = x.shape[:2]
            top, left = (h - s) // 2, (w - s) // 2
            if top >= 0 and left >= 0:
                x = x[top:top + s, left:left + s]
            else:  # smaller than the crop: zero pad around it (transformers' center_crop does the same)
                nh, nw = max(s, h), max(s, w)
                canvas = np.zeros((nh, nw, 3), dtype=np.uint8)
                pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
                canvas[pt:pt + h, pl:pl + w] = x
                top, left = (nh - s) // 2, (nw - s) // 2
                x = canvas[top:top + s, left:left + s]
        x = x.transpose(2, 0, 1)  # (3, S, S)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def _anyres_crops(self, img: Image.Image) -> list[Image.Image]:
        """[base image squashed to S x S] + row-major S x S tiles of the image fitted and padded to the pinpoint."""
        w, h = img.size
        bh, bw = select_best_resolution((h, w), self.image_grid_pinpoints)
        nh, nw = _fit_size((h, w), (bh, bw))
        fitted = img.resize((nw, nh), resample=self.resample)
        canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
        canvas.paste(fitted, ((bw - nw) // 2, (bh - nh) // 2))
        s = self.crop_size
        tiles = [canvas.crop((j, i, j + s, i + s)) for i in range(0, bh, s) for j in range(0, bw, s)]
        if "shortest_edge" in self.size:
            base_hw = (self.size["shortest_edge"], self.size["shortest_edge"])
        else:
            base_hw = (self.size["height"], self.size["width"])
        base = img.resize((base_hw[1], base_hw[0]), resample=self.resample)
        return [base] + tiles

    def _square(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        m = max(w, h)
        colour = tuple(int(c * 255) for c in self.image_mean)  # (122, 116, 104) for CLIP
        canvas = Image.new("RGB", (m, m), colour)
        canvas.paste(img, ((m - w) // 2, (m - h) // 2))
        return canvas

    def process(self, images: list) -> dict:
        """images: list of PIL images -> dict(pixel_values, image_sizes).

        llava: pixel_values (B, 3, S, S); llava_next: (B, n_max, 3, S, S) zero-padded over tiles.
        image_sizes: (B, 2) long, (height, width) of each original image.
        """
        if isinstance(images, Image.Image):
            images = [images]
        arrays, sizes = [], []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise ValueError(f"ImageProcessor.process: images[{i}] is {type(img).__name__}, not a PIL image")
            if img.width < 1 or img.height < 1:
                raise ValueError(f"ImageProcessor.process: images[{i}] is empty ({img.width}x{img.height})")
            img = _to_rgb(img)
            sizes.append((img.height, img.width))
            if self.model_type == "llava":
                arrays.append(self._finish(self._square(img) if self.pad_to_square else img))
            else:
                arrays.append(np.stack([self._finish(c) for c in self._anyres_crops(img)]))  # (n_i, 3, S, S)
        if not arrays:
            raise ValueError("ImageProcessor.process: no images given")
        if self.model_type == "llava_next":
            n_max = max(a.shape[0] for a in arrays)
            arrays = [np.concatenate([a, np.zeros((n_max - a.shape[0],) + a.shape[1:], np.float32)]) for a in arrays]
        return {"pixel_values": torch.from_numpy(np.stack(arrays)),
                "image_sizes": torch.tensor(sizes, dtype=torch.long)}

    __call__ = process


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


# ---------------------------------------------------------------------------------------------------- opening files
# The one image opener of every entry point (train, eval, generate, bdhs, the reference cache, the toy).
MAX_IMAGE_PIXELS = 50_000_000  # width * height above this is refused (`image_too_large`); e.g. 7071 x 7071
EXIF_TRANSPOSE_ENV = "NANOALIGN_EXIF_TRANSPOSE"  # "1": rotate upright by the EXIF orientation tag


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the counted skip key: missing_image, unreadable_image or
    image_too_large."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def exif_transpose_default() -> bool:
    """The EXIF-orientation setting: off unless the environment sets NANOALIGN_EXIF_TRANSPOSE=1.

    Off by default = the stored pixel order, as LLaVA's own training and eval code (`Image.open(f).convert('RGB')`)
    and COCO's annotations (boxes and masks are in stored orientation) use it. transformers' `load_image` rotates
    upright (`ImageOps.exif_transpose`); set the variable to 1 for that behaviour."""
    v = os.environ.get(EXIF_TRANSPOSE_ENV, "0").strip().lower()
    if v not in ("0", "1", "", "false", "true"):
        raise ValueError(f"{EXIF_TRANSPOSE_ENV}={v!r}: expected 0 or 1")
    return v in ("1", "true")


def _open_raw(src):
    """PIL image (lazy: header only) from a path, bytes or a PIL image; raises ImageError."""
    import io
    import warnings
    if isinstance(src, Image.Image):
        return src
    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours (MAX_IMAGE_PIXELS) is checked next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, (bytes, bytearray)):
                return Image.open(io.BytesIO(bytes(src)))
            return Image.open(os.fspath(src))
    except FileNotFoundError:
        raise ImageError("missing_image", f"{src}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", f"{src if isinstance(src, str) else 'image'}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        where = "image bytes" if isinstance(src, (bytes, bytearray)) else str(src)
        raise ImageError("unreadable_image", f"{where}: {type(e).__name__}: {e}") from None


def _check_pixels(img: Image.Image, src, max_pixels: int | None) -> None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if img.width * img.height > limit:
        where = "image" if isinstance(src, (bytes, bytearray, Image.Image)) else str(src)
        raise ImageError("image_too_large", f"{where}: {img.width}x{img.height} = {img.width * img.height} pixels "
                                            f"> the limit of {limit} (nanoalign.image.MAX_IMAGE_PIXELS)")


def image_size(src, exif_transpose: bool | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of the image `open_image` would return, read from the file header without decoding the
    pixels. Raises ImageError (missing_image, unreadable_image, image_too_large)."""
    img = _open_raw(src)
    try:
        _check_pixels(img, src, max_pixels)
        h, w = img.height, img.width
        if exif_transpose_default() if exif_transpose is None else exif_transpose:
            try:
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                    h, w = w, h
            except Exception:  # a broken EXIF block: exif_transpose would leave the image as stored too
                pass
        return h, w
    finally:
        if img is not src:
            img.close()


def open_image(src, exif_transpose: bool | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file, bytes or PIL image to an RGB PIL image, as transformers sees it.

    src: a path (str / PathLike), the file's bytes, or a PIL image. The pixel count is checked on the header before
    decoding (max_pixels, default MAX_IMAGE_PIXELS), so an oversized image costs no decode.
    exif_transpose: rotate upright by the EXIF tag (transformers' `load_image`); None = exif_transpose_default().
    Conversion to RGB is transformers' `convert_to_rgb` (what its image processors do with `do_convert_rgb`): an
    image with an alpha band or a transparency entry (RGBA, LA, PA, palette or L/RGB with `transparency`) is
    composited onto white; every other mode (L, 1, P, I;16, I, F, CMYK, YCbCr, ...) goes through PIL's
    `convert("RGB")`. Note transformers' `load_image` alone ends with `convert("RGB")`, which drops the alpha
    channel instead of compositing (transparent pixels show their stored colour, often black); its processors
    composite when given the PIL image as opened. We follow the processors.
    Raises ImageError with reason missing_image, unreadable_image (also for a file truncated mid-pixels) or
    image_too_large.
    """
    from PIL import ImageOps

    raw = _open_raw(src)
    try:
        _check_pixels(raw, src, max_pixels)
        raw.load()
        img = raw
        if exif_transpose_default() if exif_transpose is None else exif_transpose:
            img = ImageOps.exif_transpose(raw)
        out = _to_rgb(img)
        return out.copy() if out is raw else out  # never hand back the caller's own object or an open file
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        where = "image bytes" if isinstance(src, (bytes, bytearray)) else \
            "PIL image" if isinstance(src, Image.Image) else str(src)
        raise ImageError("unreadable_image", f"{where}: {type(e).__name__}: {e}") from None
    finally:
        if raw is not src:
            raw.close()
