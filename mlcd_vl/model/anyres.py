"""LLaVA-NeXT anyres geometry: grid choice, unpadding and visual-token counts.

Pure integer/float arithmetic, no tensors, so the data pipeline can count the visual tokens of an image without
running the model. Every formula follows upstream `mm_utils.py` / `llava_arch.py` exactly,
including its float evaluation order, because a one-row difference in `unpad` changes the token count.

Conventions: sizes and pinpoints are (width, height) as upstream writes them. transformers' LLaVA-NeXT classes use
(height, width); `swap_pinpoints` converts between the two.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from mlcd_vl.vocab import Pinpoints

_RANGE_PATTERN = re.compile(r"\((\d+)x(\d+)\)")
_ANYRES_MAX_PATTERN = re.compile(r"^anyres_max_(\d+)$")
IMAGE_MODES = ("square", "pad", "anyres")  # plus anyres_max_N
MERGE_TYPES = ("flat", "spatial_unpad")


def parse_pinpoints(pinpoints: str | list | tuple | None, crop_size: int) -> Pinpoints:
    """Return (width, height) pinpoints from a list, a Python-literal string or a range string `(1x1),...,(3x3)`.

    A range string expands to every (i, j) with the width factor in the outer loop, times `crop_size`, in
    upstream's order. Unlike upstream we do not restrict `crop_size` to {224, 336, 384, 448, 512}.
    """
    if pinpoints is None:
        return []
    if isinstance(pinpoints, str):
        if "x" in pinpoints:
            matches = _RANGE_PATTERN.findall(pinpoints)
            if not matches:
                raise ValueError(f"cannot parse grid pinpoints range {pinpoints!r}; expected '(1x1),...,(3x3)'")
            (w0, h0), (w1, h1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
            return [(i * crop_size, j * crop_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        try:
            pinpoints = ast.literal_eval(pinpoints)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"cannot parse grid pinpoints {pinpoints!r}") from error
    try:
        pairs = [tuple(p) for p in pinpoints]
    except TypeError as error:
        raise ValueError(f"grid pinpoints must be a list of (width, height) pairs, got {pinpoints!r}") from error
    result = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(v, (int, float)) and v == int(v) and v > 0 for v in pair):
            raise ValueError(f"grid pinpoint {pair!r} must be a pair of positive integers (width, height)")
        result.append((int(pair[0]), int(pair[1])))
    return result


def swap_pinpoints(pinpoints: Pinpoints) -> Pinpoints:
    """(width, height) <-> (height, width)."""
    return [(b, a) for a, b in pinpoints]


def anyres_max_patches(image_mode: str) -> int | None:
    """N of `anyres_max_N`, else None."""
    match = _ANYRES_MAX_PATTERN.match(image_mode)
    return int(match.group(1)) if match else None


def validate_image_mode(image_mode: str, merge_type: str) -> None:
    if image_mode not in IMAGE_MODES and anyres_max_patches(image_mode) is None:
        raise ValueError(f"unknown image mode {image_mode!r}; choose square, pad, anyres or anyres_max_N")
    if merge_type not in MERGE_TYPES:
        raise ValueError(f"unknown merge type {merge_type!r}; choose one of {MERGE_TYPES}")


def is_anyres(image_mode: str) -> bool:
    return image_mode == "anyres" or anyres_max_patches(image_mode) is not None


def select_best_resolution(image_size: tuple[int, int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The (W, H) pinpoint that keeps the most original pixels, then wastes the fewest; first wins exact ties."""
    width, height = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits image size {image_size} (pinpoints {pinpoints})")
    return best


def resized_size_in_canvas(image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Size the image is resized to before being pasted (centred, black) on the pinpoint canvas."""
    width, height = image_size
    canvas_w, canvas_h = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return canvas_w, min(math.ceil(height * scale_w), canvas_h)
    return min(math.ceil(width * scale_h), canvas_w), canvas_h


def grid_shape(image_size: tuple[int, int], pinpoints: Pinpoints, crop_size: int) -> tuple[int, int]:
    """(tiles across, tiles down) of the anyres grid for an image of (width, height)."""
    best_w, best_h = select_best_resolution(image_size, pinpoints)
    return best_w // crop_size, best_h // crop_size


def unpadded_shape(feature_hw: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of the grid feature map kept by upstream `unpad_image`.

    Upstream removes `padding // 2` from each side, so an odd padding keeps one extra row or column.
    """
    current_h, current_w = feature_hw
    width, height = image_size
    if width / height > current_w / current_h:
        scale = current_w / width
        new_h = int(height * scale)
        pad = (current_h - new_h) // 2
        return current_h - 2 * pad, current_w
    scale = current_h / height
    new_w = int(width * scale)
    pad = (current_w - new_w) // 2
    return current_h, current_w - 2 * pad


def downscaled_shape(feature_hw: tuple[int, int], max_patches: int, unit: int) -> tuple[int, int]:
    """`anyres_max_N`: the bilinear target size when the unpadded map holds over 1.1x N crops' worth of tokens."""
    h, w = feature_hw
    times = math.sqrt(h * w / (max_patches * unit**2))
    if times > 1.1:
        return int(h // times), int(w // times)
    return h, w


@dataclass(frozen=True)
class ImageLayout:
    """How one image becomes visual tokens: crops fed to the tower and the merged token grid."""

    num_crops: int
    tokens: int
    grid: tuple[int, int] | None = None  # (tiles across, tiles down) for anyres
    best_resolution: tuple[int, int] | None = None  # (W, H)
    unpadded_hw: tuple[int, int] | None = None  # rows, columns after unpad
    final_hw: tuple[int, int] | None = None  # rows, columns after the anyres_max downscale


def image_layout(
    image_size: tuple[int, int],
    *,
    image_mode: str,
    merge_type: str,
    crop_size: int,
    patch_size: int,
    pinpoints: Pinpoints | None = None,
) -> ImageLayout:
    """The visual-token layout of one image of (width, height) in a given mode; the single source of token counts."""
    validate_image_mode(image_mode, merge_type)
    unit = crop_size // patch_size
    base = unit * unit
    if not is_anyres(image_mode):
        return ImageLayout(num_crops=1, tokens=base + (1 if merge_type == "spatial_unpad" else 0))
    if not pinpoints:
        raise ValueError(f"image mode {image_mode!r} needs grid pinpoints")
    best = select_best_resolution(image_size, pinpoints)
    grid_w, grid_h = best[0] // crop_size, best[1] // crop_size
    num_crops = 1 + grid_w * grid_h
    if merge_type == "flat":
        return ImageLayout(num_crops=num_crops, tokens=num_crops * base, grid=(grid_w, grid_h), best_resolution=best)
    unpadded = unpadded_shape((grid_h * unit, grid_w * unit), image_size)
    max_patches = anyres_max_patches(image_mode)
    final = downscaled_shape(unpadded, max_patches, unit) if max_patches is not None else unpadded
    tokens = base + final[0] * (final[1] + 1)
    return ImageLayout(num_crops, tokens, (grid_w, grid_h), best, unpadded, final)
