"""mlcd-vl: train, evaluate and serve LLaVA-NeXT-style VLMs built from an MLCD vision tower and Qwen2.5."""

__version__ = "0.1.0"
