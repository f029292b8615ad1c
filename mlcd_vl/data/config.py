"""The data settings: what to read, how records become samples and how samples become batches.

It is the `data:` section of a training recipe key for key (`data.train`, `data.packing`, ...), and what
`mlcd-vl data check` builds from its options; the dataset, the label builder and the training loader all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcd_vl.vocab import DEFAULT_MAX_PIXELS

LABEL_MODES = ("default", "upstream")


@dataclass
class DataConfig:
    # what to read
    train: str = ""  # file, brace list, YAML mixture, datasets folder or preset (lcs-558k, llava-next-780k)
    image_folder: str | None = None
    preset_dir: str | None = None  # local folder holding a preset dataset (else downloaded)
    cache_dir: str | None = None  # record indices, length tables, manifests (`data.cache`); None: default, "off"
    # records -> samples
    max_length: int = 32768  # tokens after <image> expansion; upstream model_max_length
    template: str | None = None  # None: the model's template
    label_mode: str = "default"  # default (assistant turns only) | upstream (its masking quirk, parity runs)
    multi_image_mode: str = "pad"  # mode for records with several images ("pad" as upstream, or "model")
    upstream_image_convert: bool = False  # plain .convert("RGB") (alpha dropped, no EXIF) as upstream
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    image_to_front: bool = True  # upstream preprocess_multimodal
    strict: bool = False  # raise DataError instead of skipping a bad record
    # samples -> batches (training)
    packing: bool = False  # several samples per row, block-diagonal attention
    token_budget: int | None = None  # tokens per packed row; padded batches use batch.per_device_batch_size
    group_by_modality: bool = False
    drop_last: bool = False
    num_workers: int = 4  # DataLoader workers per process; the start-up scan uses this x the processes on the node
    order_file: str | None = None  # replay these micro-batches (record ids, `data.order_file`), no sampling

    def __post_init__(self) -> None:
        from mlcd_vl.model import anyres

        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.multi_image_mode != "model":
            anyres.validate_image_mode(self.multi_image_mode, "flat")
        if self.packing and self.token_budget is None:
            raise ValueError("packing needs a token budget per row (data.token_budget, e.g. data.max_length)")
        if self.order_file and self.packing:
            raise ValueError("data.order_file replays padded micro-batches; it cannot be combined with data.packing")
