"""Images -> visual token blocks -> `inputs_embeds`: the one place the LLaVA merge happens.

Training, evaluation and serving all call this module instead of the composite's own `forward(pixel_values=...)`,
because upstream's recipe needs things transformers' classes cannot express: multi-image samples seen as single
padded crops, text-only samples that still run the tower (ZeRO-3 needs every rank in the same collectives), packed
rows holding several samples' images, and upstream's exact unpad rounding. The merge follows upstream's
`prepare_inputs_labels_for_multimodal` (`llava_arch.py`) step by step; the token counts it produces are the
ones `anyres.image_layout` predicts, which the data pipeline uses to expand `<image>`.

Prompts carry one `image_token_id` per visual token (transformers' convention), so splicing is a masked scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from mlcd_vl.model import anyres
from mlcd_vl.model.build import VLMSettings


@dataclass
class ImageInput:
    """One image's crops as produced by `pixels.process_image`, its (width, height) and the mode that made them."""

    pixels: torch.Tensor  # [3, S, S] or [crops, 3, S, S]
    size: tuple[int, int]
    mode: str  # "square", "pad", "anyres" or "anyres_max_N"

    @property
    def crops(self) -> torch.Tensor:
        return self.pixels if self.pixels.dim() == 4 else self.pixels.unsqueeze(0)


class VisualTokenMismatch(ValueError):
    """The prompt's image placeholders and the images' features disagree."""


def vision_tower_features(model: PreTrainedModel, crops: torch.Tensor) -> torch.Tensor:
    """Tower hidden states at the configured layer, CLS dropped for the "default" strategy: [crops, T, Dv]."""
    config = model.config
    tower = model.model.vision_tower
    outputs = tower(crops.to(dtype=tower.dtype), output_hidden_states=True)
    features = outputs.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features


def encode_crops(model: PreTrainedModel, crops: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens per crop: [crops, T, D_llm]."""
    return model.model.multi_modal_projector(vision_tower_features(model, crops))


def merge_image(features: torch.Tensor, image: ImageInput, settings: VLMSettings,
                newline: torch.Tensor | None) -> torch.Tensor:
    """One image's crop features [crops, T, C] -> its token block [tokens, C] (upstream's merge)."""
    if settings.merge_type == "flat":
        return features.flatten(0, 1)
    if features.shape[0] == 1:
        return torch.cat([features[0], newline[None].to(features.dtype)], dim=0)
    unit = settings.crop_size // settings.patch_size
    base, tiles = features[0], features[1:]
    grid_w, grid_h = anyres.grid_shape(image.size, settings.pinpoints, settings.crop_size)
    if tiles.shape[0] != grid_w * grid_h:
        raise VisualTokenMismatch(f"image of size {image.size} has {tiles.shape[0]} tiles, its grid needs "
                                  f"{grid_w}x{grid_h}")
    channels = tiles.shape[-1]
    grid = tiles.view(grid_h, grid_w, unit, unit, channels).permute(4, 0, 2, 1, 3)
    grid = grid.flatten(1, 2).flatten(2, 3)  # [C, grid_h*unit, grid_w*unit]
    rows, cols = anyres.unpadded_shape((grid.shape[1], grid.shape[2]), image.size)
    top, left = (grid.shape[1] - rows) // 2, (grid.shape[2] - cols) // 2
    grid = grid[:, top:top + rows, left:left + cols]
    max_patches = anyres.anyres_max_patches(settings.image_mode)
    if max_patches is not None:
        target = anyres.downscaled_shape((rows, cols), max_patches, unit)
        if target != (rows, cols):
            grid = F.interpolate(grid[None], list(target), mode="bilinear")[0]
    grid = torch.cat([grid, newline[:, None, None].expand(channels, grid.shape[1], 1).to(grid.dtype)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)


def encode_images(model: PreTrainedModel, settings: VLMSettings, images: list[ImageInput]) -> list[torch.Tensor]:
    """Token blocks for a list of images, with a single tower pass over all their crops."""
    if not images:
        return []
    all_crops = torch.cat([image.crops for image in images], dim=0)
    features = encode_crops(model, all_crops)
    newline = getattr(model.model, "image_newline", None)
    blocks, start = [], 0
    for image in images:
        count = image.crops.shape[0]
        blocks.append(merge_image(features[start:start + count], image, settings, newline))
        start += count
    return blocks


def expected_tokens(image: ImageInput, settings: VLMSettings) -> int:
    """What `merge_image` will produce for this image (used to expand `<image>` in prompts)."""
    return anyres.image_layout(image.size, image_mode=image.mode, merge_type=settings.merge_type,
                               crop_size=settings.crop_size, patch_size=settings.patch_size,
                               pinpoints=settings.pinpoints).tokens


def embed_inputs(model: PreTrainedModel, settings: VLMSettings, input_ids: torch.Tensor,
                 images: list[ImageInput], dummy_crop: torch.Tensor | None = None) -> torch.Tensor:
    """Text embeddings with every run of image tokens replaced, in order, by the images' token blocks.

    With no images and a `dummy_crop`, the tower and projector still run and contribute exactly zero, so every
    rank of a ZeRO-3 step takes part in the same parameter gathers (upstream's text-only dummy image).
    """
    image_token_id = model.config.image_token_id
    mask = input_ids == image_token_id
    safe_ids = input_ids.masked_fill(mask, 0)  # the placeholder id may lie beyond the embedding rows
    embeds = model.get_input_embeddings()(safe_ids)
    blocks = encode_images(model, settings, images)
    if blocks:
        features = torch.cat(blocks, dim=0).to(embeds.dtype)
        if features.shape[0] != int(mask.sum()):
            raise VisualTokenMismatch(
                f"prompt has {int(mask.sum())} image tokens but the {len(images)} image(s) give {features.shape[0]}")
        embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), features)
    elif bool(mask.any()):
        raise VisualTokenMismatch(f"prompt has {int(mask.sum())} image tokens but no images were given")
    elif dummy_crop is not None:
        zero = encode_crops(model, dummy_crop).sum() * 0.0
        newline = getattr(model.model, "image_newline", None)
        if newline is not None:
            zero = zero + newline.sum() * 0.0
        embeds = embeds + zero.to(embeds.dtype)
    return embeds
