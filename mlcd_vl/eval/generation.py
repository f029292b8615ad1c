"""How lmms-eval's per-request `gen_kwargs` become the engine's decoding settings."""

from __future__ import annotations


#: gen_kwargs keys the adapter understands; any other key is ignored with a warning (e.g. `image_aspect_ratio`,
#: which lmms-eval's llava wrappers read: our image mode always comes from the checkpoint).
GENERATION_KEYS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "until",
                   "repetition_penalty")


def effective_generation(gen_kwargs: dict, *, max_new_tokens: int = 1024, repetition_penalty: float | str = 1.0,
                         stop_at_until: bool = True) -> tuple[dict, list[str]]:
    """The decoding values the adapter uses for one request's `gen_kwargs`: (GenerationSettings fields, ignored keys).

    * `max_new_tokens`: the task's, else the model argument's (1024, as lmms-eval's llava wrappers);
    * greedy unless sampling is asked for (`do_sample`, or a temperature > 0 without `do_sample`), and then
      `temperature` (1.0 if 0), `top_p`, `top_k` apply;
    * `num_beams` must be 1 (beam search is not implemented; a ValueError says so);
    * `until` (lmms-eval adds `["\\n\\n"]` to every task without one) become stop strings when `stop_at_until`;
    * `repetition_penalty`: the request's, else the model argument's; 1.0 by default, never the checkpoint's
      generation_config unless the model argument is `checkpoint`.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = float(kwargs.pop("temperature", 0) or 0)
    do_sample = kwargs.pop("do_sample", None)
    top_p, top_k = kwargs.pop("top_p", None), kwargs.pop("top_k", None)
    beams = int(kwargs.pop("num_beams", 1) or 1)
    if beams != 1:
        raise ValueError(f"num_beams={beams}: mlcd_llava decodes greedily or by sampling, beam search is not "
                         "implemented; use num_beams=1")
    penalty = kwargs.pop("repetition_penalty", repetition_penalty)
    sampling = _truthy(do_sample) if do_sample is not None else temperature > 0
    settings = {
        "max_new_tokens": int(kwargs.pop("max_new_tokens", None) or max_new_tokens),
        "temperature": (temperature or 1.0) if sampling else 0.0,
        "top_p": float(top_p) if sampling and top_p is not None else 1.0,
        "top_k": int(top_k) if sampling and top_k is not None else 0,
        "repetition_penalty": None if str(penalty).lower() == "checkpoint" else float(penalty),
        "stop": tuple(s for s in until if s) if stop_at_until else (),
    }
    return settings, sorted(kwargs)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
