"""anyres geometry and visual-token counts (mlcd_vl.model.anyres).

Three independent sources of truth:
* upstream's token-count table for the real bigG-448 / ViT-L-336 grids (written out below),
* a brute-force simulation of upstream's merge written here with NumPy/torch (tile map, `[p:H-p]` unpad slicing,
  bilinear anyres_max downscale, newline column, base prepended),
* the upstream manifest (every sample of every model; read from manifest.json, nothing hard-coded from it).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from upstream_utils import select_best_resolution

from mlcd_vl.model import anyres

# --------------------------------------------------------------------------------------------------------------------
# Settings of the real recipes (upstream mm_utils.py / llava_arch.py)
# --------------------------------------------------------------------------------------------------------------------

PATCH = 14
BIGG_CROP, VITL_CROP = 448, 336
BIGG_GRID = [(448, 896), (896, 448), (896, 896), (1344, 448), (448, 1344)]
VITL_GRID = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
RANGE_6X6 = "(1x1),...,(6x6)"
LARGE_SQUARE = (5000, 5000)

# (w, h), bigG (grid, tokens), ViT-L (grid, tokens), grid map rows x cols kept for bigG (None: not in the table)
SPEC_TABLE = [
    ((336, 336), ((1, 2), 2080), ((1, 2), 1176), (32, 32)),
    ((500, 500), ((2, 2), 5184), ((2, 2), 2928), (64, 64)),
    ((640, 480), ((2, 2), 4144), ((2, 2), 2340), (48, 64)),
    ((800, 600), ((2, 2), 4144), ((2, 2), 2340), (48, 64)),
    ((1024, 768), ((2, 2), 4144), ((2, 2), 2340), (48, 64)),
    ((1920, 1080), ((2, 2), 3364), ((2, 2), 1948), None),
    ((2000, 3000), ((2, 2), 3776), ((2, 2), 2160), None),
]

ODD_SIZES = [(1, 1), (37, 161), (4000, 100)]


def _layout(size, mode, merge, crop, pinpoints=None, patch=PATCH):
    return anyres.image_layout(size, image_mode=mode, merge_type=merge, crop_size=crop, patch_size=patch,
                               pinpoints=pinpoints)


# --------------------------------------------------------------------------------------------------------------------
# Independent brute force: upstream's algorithm on simulated feature maps
# --------------------------------------------------------------------------------------------------------------------


def _bf_unpad(fmap: np.ndarray, size) -> np.ndarray:
    """upstream llava_arch.unpad_image on a (rows, cols) map: slice `[p:H-p]` along the padded axis."""
    ow, oh = size
    ch, cw = fmap.shape
    if ow / oh > cw / ch:
        new_h = int(oh * (cw / ow))
        p = (ch - new_h) // 2
        return fmap[p:ch - p, :]
    new_w = int(ow * (ch / oh))
    p = (cw - new_w) // 2
    return fmap[:, p:cw - p]


def brute_force_tokens(size, *, mode, merge, crop, pinpoints, patch=PATCH):
    """Number of visual tokens upstream splices for one image, plus the intermediate map shapes."""
    unit = crop // patch
    base = np.zeros((unit * unit,), dtype=np.int64)  # base crop tokens, no newline
    if mode in ("square", "pad"):
        return base.size + (1 if merge == "spatial_unpad" else 0), None
    best = select_best_resolution(size, pinpoints)
    gw, gh = best[0] // crop, best[1] // crop
    tiles = np.arange(gw * gh).reshape(gh, gw)
    if merge == "flat":
        return (1 + gw * gh) * unit * unit, {"grid": (gw, gh), "best": best}
    # (gh, gw, unit, unit) tile features -> one (gh*unit, gw*unit) map, tiles row-major
    per_tile = np.broadcast_to(tiles[:, :, None, None], (gh, gw, unit, unit))
    fmap = per_tile.transpose(0, 2, 1, 3).reshape(gh * unit, gw * unit)
    assert (fmap[:unit, :unit] == 0).all() and (fmap[-1, -1] == gw * gh - 1)
    unpadded = _bf_unpad(fmap, size)
    final = torch.from_numpy(unpadded.astype(np.float32))[None, None]
    max_n = None
    if mode.startswith("anyres_max_"):
        max_n = int(mode[len("anyres_max_"):])
        h, w = unpadded.shape
        times = math.sqrt(h * w / (max_n * unit**2))
        if times > 1.1:
            final = torch.nn.functional.interpolate(final, [int(h // times), int(w // times)], mode="bilinear")
    final = final[0, 0].numpy()
    with_newline = np.concatenate([final, np.full((final.shape[0], 1), -1.0, dtype=final.dtype)], axis=1)
    tokens = np.concatenate([base.astype(np.float32), with_newline.reshape(-1)])
    info = {"grid": (gw, gh), "best": best, "map": fmap.shape, "unpadded": unpadded.shape, "final": final.shape}
    return tokens.size, info


# --------------------------------------------------------------------------------------------------------------------
# Reference-spec 1.11
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, bigg, vitl, bigg_kept", SPEC_TABLE, ids=[f"{w}x{h}" for (w, h), *_ in SPEC_TABLE])
def test_spec_table_rows(size, bigg, vitl, bigg_kept):
    for (crop, grid), (expected_grid, expected_tokens) in (((BIGG_CROP, BIGG_GRID), bigg), ((VITL_CROP, VITL_GRID), vitl)):
        layout = _layout(size, "anyres", "spatial_unpad", crop, grid)
        assert layout.grid == expected_grid, (size, crop)
        assert layout.tokens == expected_tokens, (size, crop)
        assert layout.num_crops == 1 + expected_grid[0] * expected_grid[1]
        assert layout.best_resolution == (expected_grid[0] * crop, expected_grid[1] * crop)
        assert layout.best_resolution in grid
        assert layout.final_hw == layout.unpadded_hw  # plain anyres never downscales
        unit = crop // PATCH
        assert layout.tokens == unit * unit + layout.final_hw[0] * (layout.final_hw[1] + 1)
        assert brute_force_tokens(size, mode="anyres", merge="spatial_unpad", crop=crop, pinpoints=grid)[0] \
            == expected_tokens
    if bigg_kept is not None:
        assert _layout(size, "anyres", "spatial_unpad", BIGG_CROP, BIGG_GRID).unpadded_hw == bigg_kept


def test_bigg_grid_has_no_single_tile():
    """No (448, 448) pinpoint: even a tiny or exactly-448 image gets two tiles (first of the two ties: 1x2)."""
    for size in [(1, 1), (448, 448), (100, 100)]:
        assert _layout(size, "anyres", "spatial_unpad", BIGG_CROP, BIGG_GRID).grid == (1, 2)


@pytest.mark.parametrize("crop, base", [(VITL_CROP, 576), (BIGG_CROP, 1024)])
@pytest.mark.parametrize("mode", ["square", "pad"])
def test_base_counts(crop, base, mode):
    for size in [(crop, crop), (640, 480), (1, 1)]:
        flat = _layout(size, mode, "flat", crop)
        unpad = _layout(size, mode, "spatial_unpad", crop)
        assert (flat.num_crops, flat.tokens) == (1, base)
        assert (unpad.num_crops, unpad.tokens) == (1, base + 1)
        assert flat.grid is None and unpad.grid is None


def test_finetune_ov_6x6_anyres_maximum():
    pinpoints = anyres.parse_pinpoints(RANGE_6X6, VITL_CROP)
    assert len(pinpoints) == 36
    layout = _layout(LARGE_SQUARE, "anyres", "spatial_unpad", VITL_CROP, pinpoints)
    assert layout.grid == (6, 6)
    assert layout.num_crops == 37
    assert layout.tokens == 576 + 144 * 145 == 21_456


@pytest.mark.parametrize("crop, expected, side", [(BIGG_CROP, 10_336, 96), (VITL_CROP, 5_832, 72)])
def test_anyres_max_9_large_square(crop, expected, side):
    pinpoints = anyres.parse_pinpoints(RANGE_6X6, crop)
    layout = _layout(LARGE_SQUARE, "anyres_max_9", "spatial_unpad", crop, pinpoints)
    unit = crop // PATCH
    assert layout.grid == (6, 6)
    assert layout.unpadded_hw == (6 * unit, 6 * unit)  # square image: nothing unpadded
    assert layout.final_hw == (side, side)  # times = 2
    assert layout.tokens == expected
    assert brute_force_tokens(LARGE_SQUARE, mode="anyres_max_9", merge="spatial_unpad", crop=crop,
                              pinpoints=pinpoints)[0] == expected


def test_flat_anyres_counts_every_crop():
    layout = _layout((640, 480), "anyres", "flat", BIGG_CROP, BIGG_GRID)
    assert layout.num_crops == 5 and layout.tokens == 5 * 1024
    assert layout.unpadded_hw is None


# --------------------------------------------------------------------------------------------------------------------
# Odd sizes and a random sweep against the brute force
# --------------------------------------------------------------------------------------------------------------------

CONFIGS = {
    "bigG448-pin5": ("anyres", BIGG_CROP, BIGG_GRID),
    "vitL336-pin5": ("anyres", VITL_CROP, VITL_GRID),
    "ov336-6x6": ("anyres", VITL_CROP, anyres.parse_pinpoints(RANGE_6X6, VITL_CROP)),
    "max9-448-6x6": ("anyres_max_9", BIGG_CROP, anyres.parse_pinpoints(RANGE_6X6, BIGG_CROP)),
    "max9-336-6x6": ("anyres_max_9", VITL_CROP, anyres.parse_pinpoints(RANGE_6X6, VITL_CROP)),
    "max4-70-3x3": ("anyres_max_4", 70, anyres.parse_pinpoints("(1x1),...,(3x3)", 70)),
    "pin5-70": ("anyres", 70, [(70, 140), (140, 70), (140, 140), (210, 70), (70, 210)]),
}


def _check_against_brute_force(size, mode, merge, crop, pinpoints):
    layout = _layout(size, mode, merge, crop, pinpoints)
    tokens, info = brute_force_tokens(size, mode=mode, merge=merge, crop=crop, pinpoints=pinpoints)
    assert layout.tokens == tokens, (size, mode, merge, crop)
    assert layout.grid == info["grid"] and layout.best_resolution == info["best"]
    assert layout.num_crops == 1 + info["grid"][0] * info["grid"][1]
    if merge == "spatial_unpad":
        assert layout.unpadded_hw == info["unpadded"] and layout.final_hw == info["final"]
    return layout


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"{w}x{h}" for w, h in ODD_SIZES])
def test_odd_sizes_valid_layout(size, config):
    mode, crop, pinpoints = CONFIGS[config]
    unit = crop // PATCH
    layout = _check_against_brute_force(size, mode, "spatial_unpad", crop, pinpoints)
    assert layout.tokens > unit * unit
    assert layout.best_resolution in pinpoints
    gw, gh = layout.grid
    assert gw >= 1 and gh >= 1 and (gw * crop, gh * crop) in pinpoints
    rows, cols = layout.unpadded_hw
    assert 0 < rows <= gh * unit and 0 < cols <= gw * unit
    assert 0 < layout.final_hw[0] <= rows and 0 < layout.final_hw[1] <= cols
    _check_against_brute_force(size, mode, "flat", crop, pinpoints)


def test_random_sizes_match_brute_force_and_bounds():
    rng = random.Random(1234)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(150)]
    sizes += [(rng.randint(1, 300), rng.randint(1, 300)) for _ in range(50)]
    sizes += [(rng.randint(2000, 8000), rng.randint(1, 200)) for _ in range(25)]  # very flat
    sizes += [(h, w) for w, h in sizes[-25:]]  # very tall
    bounds = {"bigG448-pin5": 5184, "vitL336-pin5": 2928, "ov336-6x6": 21_456,
              # just below the 1.1 threshold, no downscale (upstream's bounds)
              "max9-448-6x6": 12_367, "max9-336-6x6": 6_992}
    for config, (mode, crop, pinpoints) in CONFIGS.items():
        for size in sizes:
            layout = _check_against_brute_force(size, mode, "spatial_unpad", crop, pinpoints)
            if config in bounds:
                assert layout.tokens <= bounds[config], (config, size, layout)


def test_unpad_keeps_extra_row_on_odd_padding():
    # 70x70 on the 70-pixel 5-pinpoint grid: map 10x5, content 5 rows, padding 5 -> 2 per side -> 6 kept.
    assert anyres.unpadded_shape((10, 5), (70, 70)) == (6, 5)
    assert anyres.unpadded_shape((5, 15), (200, 40)) == (3, 15)
    assert anyres.unpadded_shape((15, 5), (45, 300)) == (15, 3)


def test_downscaled_shape_threshold():
    unit = 5
    assert anyres.downscaled_shape((15, 10), 4, unit) == (12, 8)  # times = 1.2247
    assert anyres.downscaled_shape((10, 10), 4, unit) == (10, 10)  # times = 1.0
    # times == 1.1 exactly (sqrt(121/100)) does not fire: the test is strictly greater
    assert math.sqrt(11 * 11 / 100) == 1.1
    assert anyres.downscaled_shape((11, 11), 1, 10) == (11, 11)
    assert anyres.downscaled_shape((12, 12), 1, 10) == (10, 10)  # times 1.2 -> int(12 // 1.2)
    # floor division of floats, as upstream: 192 // 2.0 and 144 // 2.0
    assert anyres.downscaled_shape((192, 192), 9, 32) == (96, 96)
    assert anyres.downscaled_shape((144, 144), 9, 24) == (72, 72)


# --------------------------------------------------------------------------------------------------------------------
# The upstream manifest: every sample of every model
# --------------------------------------------------------------------------------------------------------------------


def _tower(manifest):
    towers = manifest["architecture"]["towers"]
    return int(towers["image_size"]), int(towers["patch_size"])


def _model_pinpoints(model, crop):
    return anyres.parse_pinpoints(model.get("image_grid_pinpoints"), crop)


def _all_samples(manifest):
    for name, model in manifest["models"].items():
        for sid, sample in model["samples"].items():
            yield name, model, sid, sample


def test_manifest_has_samples(manifest):
    kinds = {("multi" if len(s["images"]) > 1 else "text" if not s["images"] else "single")
             for _, _, _, s in _all_samples(manifest)}
    assert kinds == {"multi", "text", "single"}


def test_manifest_visual_tokens(manifest):
    crop, patch = _tower(manifest)
    unit = crop // patch
    checked = 0
    for name, model, sid, sample in _all_samples(manifest):
        where = f"{name}/{sid}"
        merge = model["mm_patch_merge_type"]
        images, per_image = sample["images"], sample["visual_tokens_per_image"]
        if not images:  # text-only: one dummy crop, no image pixels, nothing spliced
            assert per_image == [] and sample["visual_tokens"] == 0, where
            assert [p["modality"] for p in sample["pixels"]] == ["text"], where
            assert all(p["pixel_key"] is None for p in sample["pixels"]), where
            assert sample["unpad_calls"] == [] and sample["interpolate_calls"] == [], where
            continue
        multi = len(images) > 1
        mode = "pad" if multi else model["image_aspect_ratio"]
        pinpoints = _model_pinpoints(model, crop)
        assert len(per_image) == len(images) == len(sample["pixels"]), where
        layouts = []
        for idx, (image, pix) in enumerate(zip(images, sample["pixels"])):
            size = tuple(pix["image_size_wh"])
            if image in manifest.get("images", {}):
                assert tuple(manifest["images"][image]["size_wh"]) == size, where
            layout = _layout(size, mode, merge, crop, pinpoints, patch)
            layouts.append(layout)
            assert layout.tokens == per_image[idx], (where, image, layout)
            bf_tokens, _ = brute_force_tokens(size, mode=mode, merge=merge, crop=crop, pinpoints=pinpoints,
                                              patch=patch)
            assert bf_tokens == per_image[idx], (where, image)
            shape = pix["shape"]
            crops = shape[0] if len(shape) == 4 else 1
            assert layout.num_crops == crops, (where, image, shape)
        assert sum(per_image) == sample["visual_tokens"], where
        assert sum(layout.num_crops for layout in layouts) == sample["n_crops"], where
        if multi or not anyres.is_anyres(mode):
            assert all(layout.grid is None for layout in layouts), where
            assert sample["unpad_calls"] == [] and sample["interpolate_calls"] == [], where
            checked += 1
            continue
        (layout,) = layouts
        assert list(layout.grid) == sample["grid_wh"], where
        assert list(layout.best_resolution) == sample["best_resolution_wh"], where
        if merge == "spatial_unpad":
            (call,) = sample["unpad_calls"]
            assert call["before_hw"] == [layout.grid[1] * unit, layout.grid[0] * unit], where
            assert call["after_hw"] == list(layout.unpadded_hw), where
            if layout.final_hw != layout.unpadded_hw:
                (interp,) = sample["interpolate_calls"]
                assert interp["in_hw"] == list(layout.unpadded_hw), where
                assert interp["out_hw"] == list(layout.final_hw), where
            else:
                assert sample["interpolate_calls"] == [], where
        else:
            assert sample["unpad_calls"] == [] and sample["interpolate_calls"] == [], where
        checked += 1
    assert checked > 0


def test_manifest_visual_token_summary(manifest):
    """The summary section agrees with the per-sample facts (and therefore with anyres, tested above)."""
    summary = manifest.get("visual_token_summary", {})
    for name, model, sid, sample in _all_samples(manifest):
        if name in summary and sid in summary[name]:
            value = summary[name][sid]
            per_image = sample["visual_tokens_per_image"]
            expected = per_image if len(per_image) > 1 else (per_image[0] if per_image else 0)
            assert value == expected, (name, sid)


# --------------------------------------------------------------------------------------------------------------------
# parse_pinpoints, anyres_max_patches, validate_image_mode
# --------------------------------------------------------------------------------------------------------------------


def test_parse_pinpoints_list_and_literal():
    expected = [(448, 896), (896, 448)]
    assert anyres.parse_pinpoints([[448, 896], [896, 448]], 448) == expected
    assert anyres.parse_pinpoints([(448, 896), (896, 448)], 448) == expected
    assert anyres.parse_pinpoints(((448, 896), (896, 448)), 448) == expected
    assert anyres.parse_pinpoints("[(448, 896), (896, 448)]", 448) == expected
    assert anyres.parse_pinpoints("[[448, 896], [896, 448]]", 336) == expected  # crop size irrelevant for literals
    assert anyres.parse_pinpoints(None, 448) == []
    assert all(isinstance(v, int) for pair in anyres.parse_pinpoints([[448.0, 896]], 448) for v in pair)


def test_parse_pinpoints_range_string_width_outer():
    assert anyres.parse_pinpoints("(1x1),...,(3x3)", 70) == [
        (70, 70), (70, 140), (70, 210), (140, 70), (140, 140), (140, 210), (210, 70), (210, 140), (210, 210)]
    assert anyres.parse_pinpoints("(1x1),...,(2x3)", 336) == [
        (336, 336), (336, 672), (336, 1008), (672, 336), (672, 672), (672, 1008)]
    assert anyres.parse_pinpoints("(2x1),(3x2)", 448) == [(896, 448), (896, 896), (1344, 448), (1344, 896)]
    six = anyres.parse_pinpoints(RANGE_6X6, 336)
    assert six == [(i * 336, j * 336) for i in range(1, 7) for j in range(1, 7)]


@pytest.mark.parametrize("garbage", ["hello", "(((", "", "[1, 2]", "[[1, 2], [3]]", "None", "axb", "(1x),(x2)"])
def test_parse_pinpoints_garbage_raises(garbage):
    with pytest.raises((ValueError, SyntaxError, TypeError, IndexError)):
        anyres.parse_pinpoints(garbage, 448)


@pytest.mark.parametrize("bad", ["axb", "(1x),(x2)", "[(0, 448)]", "[(448, -1)]"])
def test_parse_pinpoints_value_errors(bad):
    with pytest.raises(ValueError):
        anyres.parse_pinpoints(bad, 448)


def test_swap_pinpoints():
    assert anyres.swap_pinpoints(BIGG_GRID) == [(h, w) for w, h in BIGG_GRID]
    assert anyres.swap_pinpoints(anyres.swap_pinpoints(VITL_GRID)) == VITL_GRID


def test_anyres_max_patches():
    assert anyres.anyres_max_patches("anyres_max_9") == 9
    assert anyres.anyres_max_patches("anyres_max_4") == 4
    assert anyres.anyres_max_patches("anyres_max_16") == 16
    for mode in ["anyres", "square", "pad", "anyres_max_", "anyres_max_9x", "xanyres_max_9", "anyres_max"]:
        assert anyres.anyres_max_patches(mode) is None, mode
    assert anyres.is_anyres("anyres") and anyres.is_anyres("anyres_max_2")
    assert not anyres.is_anyres("square") and not anyres.is_anyres("pad")


def test_validate_image_mode():
    for mode in ["square", "pad", "anyres", "anyres_max_9", "anyres_max_1"]:
        for merge in ["flat", "spatial_unpad"]:
            anyres.validate_image_mode(mode, merge)
    for mode in ["highres", "crop_split", "anyres_max", "anyres_max_x", "Square", "", "anyres9"]:
        with pytest.raises(ValueError, match="image mode"):
            anyres.validate_image_mode(mode, "flat")
        with pytest.raises(ValueError):
            _layout((100, 100), mode, "flat", BIGG_CROP, BIGG_GRID)
    for merge in ["spatial", "unpad", "maxpool2x2", ""]:
        with pytest.raises(ValueError, match="merge type"):
            anyres.validate_image_mode("anyres", merge)


def test_anyres_needs_pinpoints():
    for pinpoints in (None, []):
        with pytest.raises(ValueError, match="pinpoints"):
            _layout((100, 100), "anyres", "spatial_unpad", BIGG_CROP, pinpoints)
    with pytest.raises(ValueError):
        anyres.select_best_resolution((100, 100), [])


def test_select_best_resolution_tie_breaks():
    # equal effective resolution: smaller waste wins; exact tie: first in the list.
    assert anyres.select_best_resolution((1, 1), BIGG_GRID) == (448, 896)
    assert anyres.select_best_resolution((1, 1), [(896, 448), (448, 896)]) == (896, 448)
    assert anyres.select_best_resolution((100, 100), [(896, 896), (448, 896)]) == (448, 896)
    assert anyres.select_best_resolution((1000, 500), BIGG_GRID) == (896, 448)
    assert anyres.resized_size_in_canvas((1000, 500), (896, 448)) == (896, 448)
    assert anyres.resized_size_in_canvas((37, 161), (448, 896)) == (math.ceil(37 * 896 / 161), 896)
    assert anyres.resized_size_in_canvas((4000, 100), (1344, 448)) == (1344, 34)
