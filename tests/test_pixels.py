"""Pixel processing (mlcd_vl.model.pixels): bit-exact parity with upstream and robust image loading.

* every manifest pixel tensor: sha256 of the float32 LE bytes, shape, and the stored tensors bit for bit;
* an independent re-implementation of upstream's PIL steps + transformers' CLIP processor (PIL backend), compared
  bit-exactly on odd-sized random images;
* load_rgb on alpha / palette / CMYK / 16-bit / grey / EXIF-rotated / broken / oversized files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from upstream_utils import select_best_resolution

from mlcd_vl.model import anyres, pixels

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _require_pillow_lt_13():
    assert PILLOW_MAJOR < 13, (
        f"Pillow {PIL.__version__} is installed: bit-exact pixel parity needs Pillow < 13 (Pillow 13 changed bicubic "
        "resizing; the upstream vectors were made with Pillow 12.3). Install pillow<13.")


def test_pillow_version_supports_parity():
    _require_pillow_lt_13()


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Manifest pixel tensors
# --------------------------------------------------------------------------------------------------------------------


def _settings(manifest, vectors_dir: Path, model: dict | None = None) -> pixels.ProcessorSettings:
    towers = manifest["architecture"]["towers"]
    crop, patch = int(towers["image_size"]), int(towers["patch_size"])
    kwargs = {}
    tower = (model or {}).get("mm_vision_tower")
    config_path = vectors_dir / tower / "preprocessor_config.json" if tower else None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        assert config["crop_size"]["height"] == crop
        kwargs = dict(shortest_edge=config["size"]["shortest_edge"], mean=tuple(config["image_mean"]),
                      std=tuple(config["image_std"]))
    return pixels.ProcessorSettings(crop_size=crop, patch_size=patch, **kwargs)


def _pixel_uses(manifest, vectors_dir):
    """pixel_key -> list of (ProcessorSettings, ImageModeSettings, expected shape, where) from the models using it."""
    uses: dict[str, list] = {}
    for name, model in manifest["models"].items():
        settings = _settings(manifest, vectors_dir, model)
        for sid, sample in model["samples"].items():
            multi = len(sample["images"]) > 1
            for pix in sample["pixels"]:
                key = pix.get("pixel_key")
                if key is None:
                    continue
                if multi:
                    mode = pixels.ImageModeSettings("pad", model["mm_patch_merge_type"])
                else:
                    mode = pixels.ImageModeSettings(
                        model["image_aspect_ratio"], model["mm_patch_merge_type"],
                        anyres.parse_pinpoints(model.get("image_grid_pinpoints"), settings.crop_size))
                uses.setdefault(key, []).append((settings, mode, pix["shape"], f"{name}/{sid}"))
    return uses


def _image_path(vectors_dir: Path, key: str) -> Path:
    return vectors_dir / "images" / f"{key.split('/', 1)[1]}.png"


def test_manifest_pixel_values(manifest, vectors_dir):
    _require_pillow_lt_13()
    uses = _pixel_uses(manifest, vectors_dir)
    entries = manifest["pixel_values"]
    assert entries, "manifest has no pixel_values"
    checked = 0
    for key, entry in entries.items():
        assert key in uses, f"pixel key {key} is not used by any sample"
        image = pixels.load_rgb(_image_path(vectors_dir, key), upstream_convert=True)
        for settings, mode, sample_shape, where in uses[key]:
            out = pixels.process_image(image, settings, mode)
            assert out.dtype == torch.float32
            assert list(out.shape) == entry["shape"] == list(sample_shape), (key, where)
            assert _sha(out.numpy()) == entry["sha256_f32le"], f"{key} ({where}, mode {mode.image_mode}) differs"
            checked += 1
    assert checked >= len(entries)


def test_stored_pixel_tensors(manifest, vectors_dir):
    _require_pillow_lt_13()
    from safetensors.torch import load_file

    stored = load_file(vectors_dir / "pixel_values.safetensors")
    entries = manifest["pixel_values"]
    assert set(stored) <= set(entries)
    assert {k for k, e in entries.items() if e.get("stored")} == set(stored)
    uses = _pixel_uses(manifest, vectors_dir)
    for key, tensor in stored.items():
        assert _sha(tensor.numpy()) == entries[key]["sha256_f32le"], key  # the file agrees with the manifest
        image = pixels.load_rgb(_image_path(vectors_dir, key), upstream_convert=True)
        for settings, mode, _, where in uses[key]:
            out = pixels.process_image(image, settings, mode)
            assert out.shape == tensor.shape, (key, where)
            assert torch.equal(out, tensor), f"{key} ({where}): max diff {(out - tensor).abs().max()}"


def test_manifest_images_and_modes(manifest, vectors_dir):
    """Files open as the manifest says; upstream_convert equals a plain .convert('RGB')."""
    for name, info in manifest.get("images", {}).items():
        path = vectors_dir / "images" / name
        with Image.open(path) as raw:
            assert raw.mode == info["file_mode"] and list(raw.size) == info["size_wh"]
            plain = np.asarray(raw.convert("RGB"))
            has_alpha = "A" in raw.mode
            alpha = np.asarray(raw.getchannel("A")) if has_alpha else None
        up = pixels.load_rgb(path, upstream_convert=True)
        assert up.mode == "RGB" and np.array_equal(np.asarray(up), plain), name
        ours = np.asarray(pixels.load_rgb(path))
        if has_alpha and (alpha == 0).any():
            hidden = alpha == 0
            assert (ours[hidden] == 255).all(), "fully transparent pixels must composite to white"
            assert not np.array_equal(ours, plain)
        elif not has_alpha:
            assert np.array_equal(ours, plain), name


def test_dummy_crop_shape(manifest, vectors_dir):
    found = 0
    for name, model in manifest["models"].items():
        settings = _settings(manifest, vectors_dir, model)
        dummy = pixels.dummy_pixels(settings)
        assert dummy.dtype == torch.float32 and not dummy.any()
        for sample in model["samples"].values():
            for pix in sample["pixels"]:
                if pix["modality"] == "text":
                    assert pix["pixel_key"] is None
                    assert list(dummy.shape) == pix["shape"], name
                    found += 1
    assert found > 0
    assert pixels.dummy_pixels(pixels.ProcessorSettings(crop_size=448, patch_size=14)).shape == (1, 3, 448, 448)


# --------------------------------------------------------------------------------------------------------------------
# Independent re-implementation of upstream's PIL steps + transformers' CLIP processor (PIL backend)
# --------------------------------------------------------------------------------------------------------------------


def _clip_processor(edge: int, crop: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop},
                                 image_mean=list(pixels.OPENAI_CLIP_MEAN), image_std=list(pixels.OPENAI_CLIP_STD))


def _ref_resize_and_pad(image, target_resolution):
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))  # PIL default filter, as upstream
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def _ref_divide(image, patch_size):
    width, height = image.size
    return [image.crop((j, i, j + patch_size, i + patch_size))
            for i in range(0, height, patch_size) for j in range(0, width, patch_size)]


def reference_anyres(image, processor, pinpoints):
    best = select_best_resolution(image.size, pinpoints)
    padded = _ref_resize_and_pad(image, best)
    patches = _ref_divide(padded, processor.crop_size["height"])
    edge = processor.size["shortest_edge"]
    crops = [image.resize((edge, edge))] + patches
    return np.stack([processor.preprocess(c, return_tensors="np")["pixel_values"][0] for c in crops])


def reference_single(image, processor, mode):
    if mode == "pad":
        background = tuple(int(x * 255) for x in processor.image_mean)
        w, h = image.size
        if w != h:
            side = max(w, h)
            square = Image.new(image.mode, (side, side), background)
            square.paste(image, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
            image = square
    return processor.preprocess(image, return_tensors="np")["pixel_values"][0]


def _random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    # smooth field + noise, so resizing filters actually matter
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(xx[..., None] / (3 + width / 7) + np.arange(3)) * 100 + 128
            + np.cos(yy[..., None] / (2 + height / 5)) * 50)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="RGB")


ODD_SIZES = [(1, 1), (37, 161), (4000, 100), (333, 517)]
GRIDS = {
    "bigG448-pin5": (448, [(448, 896), (896, 448), (896, 896), (1344, 448), (448, 1344)]),
    "pin5-70": (70, [(70, 140), (140, 70), (140, 140), (210, 70), (70, 210)]),
    "3x3-70": (70, anyres.parse_pinpoints("(1x1),...,(3x3)", 70)),
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"{w}x{h}" for w, h in ODD_SIZES])
def test_anyres_matches_reference_implementation(size, grid):
    _require_pillow_lt_13()
    crop, pinpoints = GRIDS[grid]
    image = _random_image(*size, seed=size[0] * 10007 + size[1])
    processor = _clip_processor(crop, crop)
    settings = pixels.ProcessorSettings(crop_size=crop, patch_size=14)
    mode = "anyres_max_4" if grid == "3x3-70" else "anyres"
    ours = pixels.process_image(image, settings, pixels.ImageModeSettings(mode, "spatial_unpad", pinpoints))
    ref = reference_anyres(image, processor, pinpoints)
    layout = anyres.image_layout(size, image_mode=mode, merge_type="spatial_unpad", crop_size=crop,
                                 patch_size=14, pinpoints=pinpoints)
    assert tuple(ours.shape) == ref.shape == (layout.num_crops, 3, crop, crop)
    assert ours.dtype == torch.float32 and ref.dtype == np.float32
    assert np.array_equal(ours.numpy(), ref), f"max diff {np.abs(ours.numpy() - ref).max()}"


@pytest.mark.parametrize("mode", ["square", "pad"])
@pytest.mark.parametrize("size", ODD_SIZES + [(70, 70), (90, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_crop_matches_reference_implementation(size, mode):
    _require_pillow_lt_13()
    image = _random_image(*size, seed=size[0] * 31 + size[1])
    processor = _clip_processor(70, 70)
    settings = pixels.ProcessorSettings(crop_size=70, patch_size=14)
    ours = pixels.process_image(image, settings, pixels.ImageModeSettings(mode, "flat"))
    ref = reference_single(image, processor, mode)
    assert tuple(ours.shape) == ref.shape == (3, 70, 70)
    assert np.array_equal(ours.numpy(), ref), f"max diff {np.abs(ours.numpy() - ref).max()}"


def test_reference_implementation_matches_manifest(manifest, vectors_dir):
    """Validates the reference above against upstream itself, so the odd-size comparisons mean something."""
    _require_pillow_lt_13()
    for key, uses in _pixel_uses(manifest, vectors_dir).items():
        image = pixels.load_rgb(_image_path(vectors_dir, key), upstream_convert=True)
        settings, mode, _, where = uses[0]
        processor = _clip_processor(settings.resize_edge, settings.crop_size)
        if anyres.is_anyres(mode.image_mode):
            ref = reference_anyres(image, processor, mode.pinpoints)
        else:
            ref = reference_single(image, processor, mode.image_mode)
        assert _sha(ref) == manifest["pixel_values"][key]["sha256_f32le"], (key, where)


def test_anyres_crop_order_and_black_padding():
    """Crop 0 is the squashed whole image; tiles are row-major and the pad area is black (normalised 0)."""
    crop = 70
    image = Image.new("RGB", (140, 35), (255, 255, 255))  # best (140, 70): 2 tiles across, 17/18 rows black
    image.paste((0, 0, 255), (70, 0, 140, 35))  # right half blue
    settings = pixels.ProcessorSettings(crop_size=crop, patch_size=14)
    out = pixels.process_image(image, settings, pixels.ImageModeSettings(
        "anyres", "spatial_unpad", [(70, 140), (140, 70), (140, 140)])).numpy()
    assert out.shape == (3, 3, crop, crop)
    mean = np.array(pixels.OPENAI_CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.array(pixels.OPENAI_CLIP_STD, dtype=np.float32)[:, None]
    black = (0 - mean) / std
    for tile in (out[1], out[2]):
        assert np.allclose(tile[:, 0, :], black) and np.allclose(tile[:, -1, :], black)
    white = (1 - mean) / std
    assert np.allclose(out[1][:, 35, 5:60], white, atol=1e-5)  # left tile: white content
    assert out[2][2, 35, 35] > out[2][0, 35, 35]  # right tile: blue content
    assert np.allclose(out[0][:, 35, 5:25], white, atol=1e-5)  # base: squashed, no black bars
    assert not np.allclose(out[0][:, 0, :], black)


# --------------------------------------------------------------------------------------------------------------------
# load_rgb
# --------------------------------------------------------------------------------------------------------------------

MAGENTA = (255, 0, 255)


def _save(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_transparent_block(tmp_path):
    array = np.zeros((30, 40, 4), dtype=np.uint8)
    array[...] = (10, 200, 30, 255)
    array[5:15, 8:20] = (*MAGENTA, 0)  # fully transparent magenta block
    array[20:25, 0:5] = (0, 0, 0, 128)  # half-transparent black
    path = _save(tmp_path, Image.fromarray(array, mode="RGBA"), "rgba.png")
    ours = pixels.load_rgb(path)
    assert ours.mode == "RGB" and ours.size == (40, 30)
    out = np.asarray(ours)
    assert (out[5:15, 8:20] == 255).all(), "transparent pixels composite on white by default"
    assert (out[0:5] == (10, 200, 30)).all(), "opaque pixels are unchanged"
    assert (np.abs(out[20:25, 0:5].astype(int) - 127) <= 1).all(), "half alpha black over white is mid grey"
    up = np.asarray(pixels.load_rgb(path, upstream_convert=True))
    assert (up[5:15, 8:20] == MAGENTA).all(), "upstream_convert keeps upstream's alpha drop (magenta visible)"
    assert (up[20:25, 0:5] == 0).all()
    assert np.array_equal(up, np.asarray(Image.fromarray(array, mode="RGBA").convert("RGB")))


def test_la_palette_cmyk_gray_modes(tmp_path):
    la = np.zeros((10, 12, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 50, 255
    la[:5, :, 1] = 0
    la_img = Image.fromarray(la, mode="LA")
    out = np.asarray(pixels.load_rgb(_save(tmp_path, la_img, "la.png")))
    assert out.shape == (10, 12, 3) and (out[:5] == 255).all() and (out[5:] == 50).all()

    pal = Image.new("P", (12, 10), 0)
    pal.putpalette([*MAGENTA, 0, 128, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 5, 12, 10))
    path = _save(tmp_path, pal, "p.png", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    loaded = pixels.load_rgb(path)
    out = np.asarray(loaded)
    assert loaded.mode == "RGB" and (out[:5] == 255).all() and (out[5:] == (0, 128, 0)).all()
    assert (np.asarray(pixels.load_rgb(path, upstream_convert=True))[:5] == MAGENTA).all()

    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    path = _save(tmp_path, cmyk, "cmyk.tif")
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    loaded = pixels.load_rgb(path)
    assert loaded.mode == "RGB" and (np.asarray(loaded) == (255, 0, 0)).all()

    grey16 = np.zeros((4, 6), dtype=np.uint16)
    grey16[1], grey16[2], grey16[3] = 65535, 32768, 257
    img16 = Image.fromarray(grey16)
    assert img16.mode == "I;16"
    for source in (img16, _save(tmp_path, img16, "grey16.png")):
        loaded = pixels.load_rgb(source)
        out = np.asarray(loaded)
        assert loaded.mode == "RGB" and out.shape == (4, 6, 3)
        assert (out[0] == 0).all() and (out[1] == 255).all() and (out[2] == 128).all() and (out[3] == 1).all(), \
            "16-bit grey is scaled to 8 bits, not clipped"

    grey = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    path = _save(tmp_path, Image.fromarray(grey, mode="L"), "grey.png")
    for upstream_convert in (False, True):
        out = np.asarray(pixels.load_rgb(path, upstream_convert=upstream_convert))
        assert out.shape == (6, 10, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))

    rgb = _random_image(9, 7, seed=3)
    assert pixels.load_rgb(rgb) is rgb or np.array_equal(np.asarray(pixels.load_rgb(rgb)), np.asarray(rgb))


def test_exif_orientation(tmp_path):
    image = _random_image(40, 20, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(tmp_path, image, "rotated.jpg", exif=exif, quality=95)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6 and check.size == (40, 20)
    assert pixels.load_rgb(path).size == (20, 40)
    assert pixels.load_rgb(path.read_bytes()).size == (20, 40)
    assert pixels.load_rgb(path, upstream_convert=True).size == (40, 20)  # upstream ignores EXIF


def _assert_image_error(source, name: str, **kwargs):
    with pytest.raises(pixels.ImageError) as info:
        pixels.load_rgb(source, **kwargs)
    assert name in str(info.value), str(info.value)
    return info.value


def test_unreadable_files_raise_image_error(tmp_path):
    _assert_image_error(tmp_path / "missing_file.png", "missing_file.png")
    empty = tmp_path / "empty_file.png"
    empty.write_bytes(b"")
    _assert_image_error(empty, "empty_file.png")
    _assert_image_error(str(empty), "empty_file.png")
    image = _random_image(64, 48, seed=11)
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        data = buffer.getvalue()
        path = tmp_path / f"truncated_{fmt.lower()}.{suffix}"
        path.write_bytes(data[: len(data) // 2])
        _assert_image_error(path, path.name)
        _assert_image_error(data[: len(data) // 2], "<image bytes>")
    text = tmp_path / "not_an_image.png"
    text.write_text("this is not an image\n")
    _assert_image_error(text, "not_an_image.png")
    _assert_image_error(b"", "<image bytes>")


def test_max_pixels(tmp_path):
    path = _save(tmp_path, _random_image(100, 80, seed=2), "big_image.png")
    _assert_image_error(path, "big_image.png", max_pixels=7999)
    assert pixels.load_rgb(path, max_pixels=8000).size == (100, 80)
    _assert_image_error(path.read_bytes(), "<image bytes>", max_pixels=7999)
    with pytest.raises(pixels.ImageError):
        pixels.load_rgb(Image.new("RGB", (100, 80)), max_pixels=7999)
    # the default limit: header-only check, the pixels are never decoded
    huge = Image.new("1", (8001, 8001))
    huge_path = _save(tmp_path, huge, "huge_image.png")
    assert 8001 * 8001 > pixels.DEFAULT_MAX_PIXELS
    _assert_image_error(huge_path, "huge_image.png")


# --------------------------------------------------------------------------------------------------------------------
# "squash" resize (SigLIP's processor, OpenCLIP's resize_mode="squash" as DFN5B uses)
# --------------------------------------------------------------------------------------------------------------------


def _squash_processors(size: int, mean, std):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hw = {"height": size, "width": size}
    return {
        "clip-no-crop": CLIPImageProcessorPil(size=hw, crop_size=hw, do_center_crop=False, image_mean=list(mean),
                                              image_std=list(std), resample=3),
        "siglip": SiglipImageProcessorPil(size=hw, image_mean=list(mean), image_std=list(std), resample=3),
    }


@pytest.mark.parametrize("size", ODD_SIZES + [(60, 60), (90, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_squash_matches_transformers_processors(size):
    """Squash resizes the whole image to SxS (no crop) exactly as SigLIP's and a crop-less CLIP processor do."""
    _require_pillow_lt_13()
    image = _random_image(*size, seed=size[0] * 13 + size[1])
    for mean, std in ((pixels.OPENAI_CLIP_MEAN, pixels.OPENAI_CLIP_STD), ((0.5,) * 3, (0.5,) * 3)):
        settings = pixels.ProcessorSettings(crop_size=60, patch_size=14, mean=mean, std=std, resize_mode="squash")
        ours = pixels.process_image(image, settings, pixels.ImageModeSettings("square", "flat")).numpy()
        for name, processor in _squash_processors(60, mean, std).items():
            ref = processor.preprocess(image, return_tensors="np")["pixel_values"][0]
            assert ours.shape == ref.shape == (3, 60, 60)
            assert np.array_equal(ours, ref), (name, mean, np.abs(ours - ref).max())


def test_squash_keeps_the_whole_image_where_shortest_edge_crops():
    """A wide image: squash keeps both ends (no centre crop); the anyres crops are SxS, so both modes agree there."""
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 30, 100))  # a red band at the left edge
    squash = pixels.ProcessorSettings(crop_size=56, patch_size=14, resize_mode="squash")
    shortest = pixels.ProcessorSettings(crop_size=56, patch_size=14)
    square = pixels.ImageModeSettings("square", "flat")
    no_green = -pixels.OPENAI_CLIP_MEAN[1] / pixels.OPENAI_CLIP_STD[1]  # the band has green 0, white has 255
    assert np.isclose(pixels.process_image(image, squash, square)[1, 28, 0].item(), no_green, atol=1e-3)
    assert pixels.process_image(image, shortest, square)[1, 28, 0].item() > 1.5  # centre crop: white
    pinpoints = [(56, 112), (112, 56), (112, 112)]
    anyres_mode = pixels.ImageModeSettings("anyres", "spatial_unpad", pinpoints)
    assert torch.equal(pixels.process_image(image, squash, anyres_mode), pixels.process_image(image, shortest,
                                                                                               anyres_mode))
    with pytest.raises(ValueError, match="resize mode"):
        pixels.ProcessorSettings(crop_size=56, patch_size=14, resize_mode="stretch")
