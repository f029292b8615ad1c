"""The `mlcd_llava` lmms-eval adapter on a tiny model: settings from gen_kwargs, request order, batching, multi-image
documents, `until`, no inherited repetition penalty, registration, upstream-format checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lmms_eval")

from datasets import load_dataset  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.tasks.chartqa import utils as chartqa_utils  # noqa: E402
from lmms_eval.tasks.mmmu import utils as mmmu_utils  # noqa: E402

from mlcd_vl.errors import UsageError  # noqa: E402
from mlcd_vl.eval import register_lmms_model  # noqa: E402
from mlcd_vl.eval.generation import effective_generation  # noqa: E402
from mlcd_vl.eval.lmms_adapter import MLCDLlava, build_question, plan_batches  # noqa: E402
from mlcd_vl.eval.synthetic import make_synthetic  # noqa: E402
from mlcd_vl.model import tiny  # noqa: E402
from mlcd_vl.model.build import build_vlm  # noqa: E402
from mlcd_vl.model.checkpoint import save_vlm  # noqa: E402
from mlcd_vl.serve.requests import GenerationSettings  # noqa: E402

CHART, MMMU = "mlcd_chartqa_local", "mlcd_mmmu_val_local"
CHART_KW = {"max_new_tokens": 12, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
MMMU_KW = {"max_new_tokens": 10, "until": ["\n\n"]}
MMMU_PROMPTS = {"prompt_type": "format", "multiple_choice_prompt": "Answer with the option's letter.",
                "open_ended_prompt": "Answer the question using a single word or phrase."}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-adapter")
    assets = tiny.write_tiny_assets(root / "assets")
    model, tokenizer, settings = build_vlm(tiny.tiny_spec(assets))
    model.generation_config.repetition_penalty = 1.5  # must not leak into evaluation
    save_vlm(model, tokenizer, settings, root / "model")
    data = make_synthetic(root / "data", items=8, stems=["chartqa", "mmmu_val"])
    docs = {CHART: {"test": load_dataset("parquet", data_files={"test": str(data["chartqa"])},
                                         cache_dir=str(root / "hf"))["test"]},
            MMMU: {"validation": load_dataset("parquet", data_files={"validation": str(data["mmmu_val"])},
                                              cache_dir=str(root / "hf"))["validation"]}}
    return {"root": root, "model": root / "model", "docs": docs, "tower": assets["tower"]}


@pytest.fixture(scope="module")
def adapter(workdir):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and immune to a busy machine
    lm = MLCDLlava(pretrained=str(workdir["model"]), batch_size=8)
    lm.task_dict = workdir["docs"]
    yield lm
    torch.set_num_threads(previous)


def _instances(docs, mixed: bool = True) -> list[Instance]:
    """ChartQA and MMMU requests interleaved (two generation settings, different lengths and image counts)."""
    out = []
    for doc_id in range(8):
        chart_doc = docs[CHART]["test"][doc_id]
        context = chartqa_utils.chartqa_doc_to_text(chart_doc, {"pre_prompt": "", "post_prompt": "\nOne word."})
        out.append((context, dict(CHART_KW), chartqa_utils.chartqa_doc_to_visual, doc_id, CHART, "test"))
        if mixed:
            context = mmmu_utils.construct_prompt(docs[MMMU]["validation"][doc_id], MMMU_PROMPTS["multiple_choice_"
                                                  "prompt"], MMMU_PROMPTS["open_ended_prompt"])
            out.append((context, dict(MMMU_KW), mmmu_utils.mmmu_doc_to_visual, doc_id, MMMU, "validation"))
    return [Instance("generate_until", args, idx=0, metadata={"task": args[4], "doc_id": args[3], "repeats": 1})
            for args in out]


def _texts(results) -> list[str]:
    return [r.text for r in results]


# ----------------------------------------------------------------------------------------- pure pieces


def test_effective_generation_honours_task_kwargs():
    values, ignored = effective_generation({"max_new_tokens": 16, "temperature": 0, "do_sample": False,
                                            "top_p": 0.5, "until": ["\n\n", ""], "image_aspect_ratio": "pad"})
    assert values == {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                      "repetition_penalty": 1.0, "stop": ("\n\n",)}
    assert ignored == ["image_aspect_ratio"]
    sampled, _ = effective_generation({"temperature": 0.7, "top_p": 0.9, "top_k": 5, "until": "END"})
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["stop"]) == (0.7, 0.9, 5, ("END",))
    assert effective_generation({"do_sample": True})[0]["temperature"] == 1.0
    assert effective_generation({"do_sample": False, "temperature": 0.7})[0]["temperature"] == 0.0
    assert effective_generation({}, max_new_tokens=7)[0]["max_new_tokens"] == 7
    assert effective_generation({"until": ["x"]}, stop_at_until=False)[0]["stop"] == ()
    assert effective_generation({}, repetition_penalty="checkpoint")[0]["repetition_penalty"] is None
    assert effective_generation({"repetition_penalty": 1.05})[0]["repetition_penalty"] == 1.05
    with pytest.raises(ValueError, match="num_beams"):
        effective_generation({"num_beams": 4})


def test_question_and_batch_plan():
    assert build_question("What?", 0) == "What?"
    assert build_question("What?", 2) == "<image> <image>\nWhat?"
    assert build_question("<image>\nWhat?", 1) == "<image>\nWhat?"
    batches = plan_batches(["a", "b", "a", "a", "b"], [1, 5, 3, 2, 4], 2)
    assert batches == [[2, 3], [0], [1, 4]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_manifest_registers_the_model():
    register_lmms_model()
    from lmms_eval.models import get_model

    assert get_model("mlcd_llava") is MLCDLlava


# ----------------------------------------------------------------------------------------- the adapter


def test_answers_in_request_order_and_batch_8_equals_batch_1(adapter, workdir):
    requests = _instances(workdir["docs"])
    adapter.batch_size_per_gpu = 8
    batched = adapter.generate_until(requests)
    adapter.batch_size_per_gpu = 1
    single = adapter.generate_until(requests)
    one_by_one = [adapter.generate_until([request])[0] for request in requests[:4]]
    adapter.batch_size_per_gpu = 8
    assert _texts(batched) == _texts(single)
    assert _texts(batched)[:4] == _texts(one_by_one)
    assert [r.token_counts.output_tokens for r in batched] == [r.token_counts.output_tokens for r in single]
    # each answer belongs to its own request: reversing the requests reverses the answers
    assert _texts(adapter.generate_until(requests[::-1])) == _texts(batched)[::-1]
    assert len(set(_texts(batched))) > 1


def test_multi_image_documents_keep_their_images_in_order(adapter, workdir):
    docs = workdir["docs"][MMMU]["validation"]
    doc_id = next(i for i in range(len(docs)) if docs[i]["image_2"] is not None and docs[i]["image_3"] is None)
    context = mmmu_utils.construct_prompt(docs[doc_id], "Answer.", "Answer.")
    request = adapter._request(context, mmmu_utils.mmmu_doc_to_visual, doc_id, MMMU, "validation")
    assert request.messages[0]["content"] == "<image> <image>\n" + context
    expected = [docs[doc_id]["image_1"].convert("RGB"), docs[doc_id]["image_2"].convert("RGB")]
    assert [im.tobytes() for im in request.images] == [im.tobytes() for im in expected]
    prompt = adapter.engine.prepare(request)
    assert len(prompt.images) == 2 and prompt.images[0].size == expected[0].size
    options_only = next(i for i in range(len(docs)) if docs[i]["image_3"] is not None)
    context = mmmu_utils.construct_prompt(docs[options_only], "Answer.", "Answer.")
    assert len(adapter._request(context, mmmu_utils.mmmu_doc_to_visual, options_only, MMMU,
                                "validation").images) == 3


def test_until_strings_stop_the_answer(adapter, workdir):
    base = _instances(workdir["docs"], mixed=False)[0]
    free = dict(CHART_KW, until=[], max_new_tokens=24)
    full = adapter.generate_until([_with_kwargs(base, free)])[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip())
    cut = adapter.generate_until([_with_kwargs(base, dict(free, until=[stop]))])[0]
    assert cut.text == full[:full.index(stop)].strip()
    assert cut.token_counts.output_tokens < 24
    adapter.stop_at_until = False
    try:
        assert adapter.generate_until([_with_kwargs(base, dict(free, until=[stop]))])[0].text == full
    finally:
        adapter.stop_at_until = True


def test_a_request_the_engine_refuses_answers_empty_and_spares_its_batch(adapter, workdir):
    requests = _instances(workdir["docs"], mixed=False)[:4]
    good = _texts(adapter.generate_until(requests))
    broken = _with_kwargs(requests[1], dict(CHART_KW), context="<image> <image>\nTwo placeholders, one image.")
    assert _texts(adapter.generate_until([requests[0], broken, *requests[2:]])) == [good[0], "", *good[2:]]


def _with_kwargs(instance: Instance, gen_kwargs: dict, context: str | None = None) -> Instance:
    args = list(instance.args)
    args[1] = gen_kwargs
    if context is not None:
        args[0] = context
    return Instance("generate_until", tuple(args), idx=0, metadata={"task": args[4], "doc_id": args[3],
                                                                     "repeats": 1})


def test_checkpoint_repetition_penalty_does_not_leak(adapter, workdir):
    assert adapter.engine.checkpoint_generation_config.repetition_penalty == 1.5
    requests = _instances(workdir["docs"], mixed=False)[:3]
    texts = _texts(adapter.generate_until(requests))
    engine_requests = [adapter._request(r.args[0], *r.args[2:]) for r in requests]
    plain = adapter.engine.generate(engine_requests, GenerationSettings(max_new_tokens=12, stop=["\n\n"]))
    penalised = adapter.engine.generate(engine_requests, GenerationSettings(max_new_tokens=12, stop=["\n\n"],
                                                                            repetition_penalty=1.5))
    assert texts == [r.text for r in plain]
    assert [r.text for r in plain] != [r.text for r in penalised]  # the penalty would change these answers
    adapter.repetition_penalty = "checkpoint"
    try:
        assert _texts(adapter.generate_until(requests)) == [r.text for r in penalised]
    finally:
        adapter.repetition_penalty = 1.0


def test_rejects_what_it_does_not_do(adapter, workdir):
    with pytest.raises(NotImplementedError, match="generate_until only"):
        adapter.loglikelihood([])
    with pytest.raises(ValueError, match="num_beams"):
        adapter.generate_until([_with_kwargs(_instances(workdir["docs"], False)[0], dict(CHART_KW, num_beams=2))])
    with pytest.raises(TypeError, match="unknown model_args"):
        MLCDLlava(pretrained=str(workdir["model"]), model_name="llava_qwen")
    with pytest.raises(UsageError, match="no such folder: .*missing"):
        MLCDLlava(pretrained=str(workdir["root"] / "missing"))
    assert adapter.device == torch.device("cpu") and (adapter.rank, adapter.world_size) == (0, 1)
    assert next(adapter.model.parameters()).dtype == torch.float32


def test_upstream_checkpoint_is_converted_once_and_answers_the_same(adapter, workdir):
    from mlcd_vl.model.convert import convert

    upstream = convert(workdir["model"], workdir["root"] / "released", log=lambda message: None)
    assert json.loads((upstream / "config.json").read_text())["architectures"] == ["LlavaQwenForCausalLM"]
    lm = MLCDLlava(pretrained=str(upstream), batch_size=8)
    converted = workdir["root"] / "released.mlcd-hf"
    assert lm.checkpoint == converted and (converted / "config.json").is_file()
    lm.task_dict = workdir["docs"]
    requests = _instances(workdir["docs"])[:6]
    assert _texts(lm.generate_until(requests)) == _texts(adapter.generate_until(requests))
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    again = MLCDLlava(pretrained=str(upstream))
    assert again.checkpoint == converted and (converted / "model.safetensors").stat().st_mtime_ns == stamp
