"""The words every floor of the package shares: label and image-token conventions, `<image>` expansion, the anyres
grid type and the decoding pixel limit.

Nothing here imports the rest of the package, so the model, data, loss, training and serving code can all use it
without pointing at each other.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # a label that is never trained on (prompt, image tokens, padding), as transformers' losses
IMAGE_PLACEHOLDER = "<image>"  # the image token in text and in the tokenizer
Pinpoints = list[tuple[int, int]]  # an anyres grid: (width, height) of each candidate resolution
DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard: 8K x 8K is far beyond anything the anyres grids use


def expand_image_tokens(ids, image_token_id: int, counts: list[int], labels=None
                        ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, int]]]:
    """Repeat each image token of `ids` as many times as its image has visual tokens (`counts`, in prompt order).

    Returns the expanded ids, the labels expanded alike (when given) and each image's (start, length) block. A
    ValueError says when the prompt's image tokens and the images do not pair up.
    """
    ids = np.asarray(ids, dtype=np.int64)
    is_image = ids == image_token_id
    if int(is_image.sum()) != len(counts):
        raise ValueError(f"the rendered prompt has {int(is_image.sum())} <image> token(s) for {len(counts)} image(s)")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[is_image] = counts
    starts = np.cumsum(repeats) - repeats
    spans = [(int(start), int(count)) for start, count in zip(starts[is_image], counts)]
    return np.repeat(ids, repeats), None if labels is None else np.repeat(labels, repeats), spans
