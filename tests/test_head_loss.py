"""The bounded-memory LM head + cross-entropy (`mlcd_vl.train.head_loss`) against the full-logits loss.

Float32 everywhere the promise is "the same": loss and gradients w.r.t. the hidden states, the head weight and bias
within 1e-6 relative (to each tensor's largest entry), on hand-made tensors and through `forward_loss` on the tiny
VLM (padded, packed, several micro-batches, both normalisations, two ranks, tied embeddings). Liger's kernel needs
CUDA: on CPU only its selection and its call (through a stand-in module with Liger's signature) are tested.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_train_foundations import accumulated_gradients, build, make_samples, mask_free, pack_batch, pad_batch
from torch import nn

from mlcd_vl.model.varlen import composite_attention
from mlcd_vl.train import head_loss as H
from mlcd_vl.train.config import ConfigError, load_config
from mlcd_vl.train.head_loss import HeadLossSettings, chunked_linear_cross_entropy, head_loss_sum
from mlcd_vl.train.loss import token_loss_sum
from mlcd_vl.vocab import IGNORE_INDEX

FULL, CHUNKED = HeadLossSettings("full"), HeadLossSettings("chunked", chunk_tokens=8)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, what: str = "") -> None:
    """Relative error ||actual - expected|| / ||expected|| <= rel (float32 sums in another order, or a matrix
    product split into row blocks, differ by a few ulps)."""
    assert actual.shape == expected.shape, what
    error, size = (actual - expected).double().norm().item(), expected.double().norm().item()
    assert error <= rel * size or error == 0.0, f"{what}: relative error {error / max(size, 1e-300):.3g} > {rel}"


def tensors(rows=41, hidden=24, vocab=67, bias=True, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=generator, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::4] = IGNORE_INDEX
    return x, w, b, targets


def loss_and_grads(fn, x, w, b, targets, scale=0.37):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    loss = fn(x, w, b, targets)
    (loss * scale).backward()  # the normalisation factor reaches backward as the incoming gradient
    return loss.detach(), [t.grad.clone() if t is not None and t.grad is not None else None for t in (x, w, b)]


def full_loss(x, w, b, targets):
    return token_loss_sum(F.linear(x, w, b), targets)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_scale", [0.37, 1.0])  # the incoming gradient guessed right, or not
def test_chunked_loss_and_gradients_equal_full_logits(chunk, bias, grad_scale):
    x, w, b, targets = tensors(bias=bias)
    expected_loss, expected = loss_and_grads(full_loss, x, w, b, targets)
    loss, actual = loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, chunk, grad_scale), x, w, b, targets)
    assert loss.dtype == torch.float32
    assert_relative(loss, expected_loss, what="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        if e is None:
            assert a is None
        else:
            assert_relative(a, e, what=name)


def test_tied_weight_gets_the_embedding_and_the_head_gradients():
    """A weight that embeds the inputs and is the head too (tie_word_embeddings): both contributions arrive."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 16, generator=generator).requires_grad_()
    ids = torch.randint(0, 50, (30,), generator=generator)
    targets = torch.randint(0, 50, (30,), generator=generator)

    def run(loss_fn):
        weight.grad = None
        hidden = torch.tanh(F.embedding(ids, weight) * 1.5)
        loss_fn(hidden, weight, None, targets).backward()
        return weight.grad.clone()

    assert_relative(run(lambda *a: chunked_linear_cross_entropy(*a, 4)), run(full_loss), what="tied weight")


def test_frozen_head_and_no_grad_mode():
    x, w, b, targets = tensors()
    w.requires_grad_(False)
    b.requires_grad_(False)
    expected_loss, expected = loss_and_grads(full_loss, x, w, b, targets)
    loss, actual = loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, 5), x, w, b, targets)
    assert actual[1] is None and actual[2] is None  # no weight gradient is computed or stored
    assert_relative(actual[0], expected[0], what="hidden")
    with torch.no_grad():
        assert_relative(chunked_linear_cross_entropy(x, w, b, targets, 5), expected_loss, what="no_grad loss")


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    x, w, b, targets = tensors()
    targets[:] = IGNORE_INDEX
    loss, grads = loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, 8), x, w, b, targets)
    assert loss.item() == 0.0 and all(g.abs().max().item() == 0.0 for g in grads)


def test_backward_twice_is_refused():
    x, w, b, targets = tensors()
    loss = chunked_linear_cross_entropy(x, w, b, targets, 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    with pytest.raises(ValueError, match="grad_scale"):
        chunked_linear_cross_entropy(x, w, b, targets, 8, grad_scale=0.0)


def test_bfloat16_is_at_least_as_accurate_as_the_full_path():
    """In bf16 neither path is exact; against a float64 reference the chunked one (float32 weight-gradient
    accumulator) must not be worse than the full one by more than rounding noise."""
    x64, w64, b64, targets = tensors(rows=96, hidden=32, vocab=120, dtype=torch.float64)
    _, reference = loss_and_grads(full_loss, x64, w64, b64, targets)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (x64, w64, b64)]
    _, full = loss_and_grads(full_loss, *low, targets)
    _, chunked = loss_and_grads(lambda *a: chunked_linear_cross_entropy(*a, 10), *low, targets)
    for name, r, f, c in zip(("hidden", "weight", "bias"), reference, full, chunked):
        full_error = ((f.double() - r).abs().max() / r.abs().max()).item()
        chunked_error = ((c.double() - r).abs().max() / r.abs().max()).item()
        assert c.dtype == torch.bfloat16
        assert chunked_error <= 2 * full_error + 2 ** -8, f"{name}: {chunked_error:.3g} vs full {full_error:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# Through forward_loss on the tiny VLM
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict:
    from mlcd_vl.model import tiny

    return tiny.write_tiny_assets(tmp_path_factory.mktemp("tiny"))


HEAD_WEIGHTS = ("lm_head.weight", "model.language_model.embed_tokens.weight")  # the second when tied


def step_gradients(model, settings, ranks, mode, head_loss) -> tuple[dict, list[torch.Tensor]]:
    """The step's parameter gradients and every micro-batch's gradient w.r.t. the last hidden states."""
    hidden_grads = []

    def record(module, args, output):
        output.register_hook(lambda grad: hidden_grads.append(grad.detach().clone()))

    handle = model.model.language_model.norm.register_forward_hook(record)
    try:
        return accumulated_gradients(model, settings, ranks, mode, head_loss), hidden_grads
    finally:
        handle.remove()


def assert_same_step(actual: tuple[dict, list], expected: tuple[dict, list], tied: bool = False) -> None:
    """Hidden-state and head-weight gradients within 1e-6 relative; the rest of the model receives the hidden-state
    gradient through its whole depth in float32, which amplifies ulp-level differences: 1e-5 there (what the
    one-big-batch tests of test_train_foundations allow)."""
    (grads, hidden), (expected_grads, expected_hidden) = actual, expected
    assert len(hidden) == len(expected_hidden) > 0
    for index, (a, e) in enumerate(zip(hidden, expected_hidden)):
        assert_relative(a, e, what=f"micro-batch {index} hidden states")
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        head = name in HEAD_WEIGHTS and (name == "lm_head.weight") != tied
        assert_relative(grads[name], expected_grads[name], 1e-6 if head else 1e-5, what=name)


def test_forward_loss_chunked_equals_full_in_every_layout(tiny_paths, monkeypatch):
    model, _, settings = build(tiny_paths, stage=1)
    model.requires_grad_(True)  # the head, embeddings, LLM, projector and tower all train
    s = make_samples(model)
    splits = {
        "padded, three micro-batches": ([[pad_batch(s[0:2]), pad_batch(s[2:5]), pad_batch(s[5:6])]], "global"),
        "padded, upstream normalisation": ([[pad_batch(s[0:1]), pad_batch(s[1:4]), pad_batch(s[4:6])]], "upstream"),
        "packed rows with the 4D mask": ([[pack_batch([s[0:3], s[3:6]])]], "global"),
        "two ranks, padded and packed": ([[pad_batch(s[0:1]), pad_batch(s[1:2])], [pack_batch([s[2:6]])]], "global"),
    }
    calls = []
    real = H.chunked_linear_cross_entropy
    monkeypatch.setattr(H, "chunked_linear_cross_entropy", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for label, (ranks, mode) in splits.items():
        expected = step_gradients(model, settings, ranks, mode, FULL)
        assert "lm_head.weight" in expected[0] and any(n.startswith("model.vision_tower.") for n in expected[0])
        calls.clear()
        actual = step_gradients(model, settings, ranks, mode, CHUNKED)
        assert calls, f"{label}: the chunked path did not run"
        try:
            assert_same_step(actual, expected)
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from None


def test_forward_loss_chunked_equals_full_with_varlen_packing_and_tied_embeddings(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    model.requires_grad_(True)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tie_word_embeddings
    model.set_attn_implementation(composite_attention("sdpa", packing=True))
    s = make_samples(model)
    ranks = [[mask_free(pack_batch([s[0:3]])), mask_free(pack_batch([s[3:6]])), pad_batch(s[1:3])]]
    expected = step_gradients(model, settings, ranks, "global", FULL)
    assert "lm_head.weight" not in expected[0]  # one parameter, named once
    assert_same_step(step_gradients(model, settings, ranks, "global", CHUNKED), expected, tied=True)


def test_auto_chunks_above_the_threshold_only(tiny_paths, monkeypatch):
    """Through `forward_loss`, with the head frozen: no weight-gradient accumulator, so chunking saves memory from
    the threshold on (a trained head: test_auto_chunks_only_where_that_saves_memory)."""
    model, _, settings = build(tiny_paths, stage=1)
    model.lm_head.requires_grad_(False)
    calls = []
    real = H.chunked_linear_cross_entropy
    monkeypatch.setattr(H, "chunked_linear_cross_entropy", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    batch = pad_batch(make_samples(model)[1:4])
    supervised = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    from mlcd_vl.train.step import forward_loss, plan_micro_batches

    step = plan_micro_batches([batch])
    at = forward_loss(model, settings, batch, step, HeadLossSettings("auto", chunk_tokens=supervised)).loss
    assert calls == []
    above = forward_loss(model, settings, batch, step, HeadLossSettings("auto", chunk_tokens=supervised - 1)).loss
    assert calls == [supervised]
    assert_relative(above.detach(), at.detach(), what="loss")


# ----------------------------------------------------------------------------------------------------------------
# Choosing the implementation; Liger
# ----------------------------------------------------------------------------------------------------------------


class WrappedHead(nn.Linear):
    """Stands in for a head with extra behaviour (a LoRA layer): its weight alone does not define its output."""


def test_choice_of_implementation(monkeypatch):
    head, wrapped = nn.Linear(4, 9, bias=False), WrappedHead(4, 9)
    choose = H.choose_implementation
    auto = HeadLossSettings("auto", chunk_tokens=100)
    assert choose(auto, 100, head, "cpu") == "full" and choose(auto, 101, head, "cpu") == "chunked"
    assert choose(auto, 10_000, wrapped, "cpu") == "full"
    assert choose(HeadLossSettings("full"), 10_000, head, "cuda") == "full"
    assert choose(HeadLossSettings("chunked"), 1, head, "cpu") == "chunked"
    with pytest.raises(ValueError, match="plain nn.Linear"):
        choose(HeadLossSettings("chunked"), 1, wrapped, "cpu")
    liger = HeadLossSettings("liger")
    assert choose(liger, 1, head, "cpu") == "chunked"  # Triton needs CUDA: same loss, our kernel
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: None)
    assert H.liger_unavailable_reason("cuda") == "liger-kernel is not installed"
    assert choose(liger, 1, head, "cuda") == "chunked"
    assert "not installed" in liger.describe("cuda") and "chunked" in liger.describe("cuda")
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: object())
    assert H.liger_unavailable_reason("cpu") == "Liger's Triton kernels need CUDA"
    assert H.liger_unavailable_reason("cuda") is None and choose(liger, 1, head, "cuda") == "liger"
    assert "Liger" in liger.describe("cuda") and "above 100" in auto.describe("cpu")
    with pytest.raises(ValueError, match="not one of"):
        HeadLossSettings("fused")
    with pytest.raises(ValueError, match="positive"):
        HeadLossSettings("auto", chunk_tokens=0)


def test_chunked_loss_runs_inside_the_head_modules_hooks():
    """DeepSpeed ZeRO-3 gathers a module's partitioned weight in its forward hooks: the chunked loss must run as the
    head's forward (the weight whole inside, the output carrying the module's backward hooks)."""
    head = nn.Linear(24, 67)
    x, _, _, targets = tensors()
    events = []
    head.register_forward_pre_hook(lambda module, args: events.append(("pre", args[0].shape)))
    head.register_forward_hook(lambda module, args, output: events.append(("post", output.shape)))
    loss = head_loss_sum(head, x, targets, CHUNKED, grad_scale=1.0)
    assert events == [("pre", x.shape), ("post", torch.Size([]))]
    assert "forward" not in head.__dict__ and head(x).shape == (41, 67)  # the class's forward is back
    loss.backward()
    assert head.weight.grad is not None and x.grad is not None


def test_liger_path_calls_the_fused_loss_with_its_argument_order(monkeypatch):
    """A stand-in with Liger's class and signature (weight first, then input) records how it is called."""
    seen = {}

    class FakeLigerLoss(nn.Module):
        def __init__(self, ce_weight=None, ignore_index=-100, reduction="mean", accum_dtype=None):
            super().__init__()
            seen.update(ignore_index=ignore_index, reduction=reduction, accum_dtype=accum_dtype)

        def forward(self, lin_weight, _input, target, bias=None):
            return F.cross_entropy(F.linear(_input, lin_weight, bias), target, ignore_index=seen["ignore_index"],
                                   reduction=seen["reduction"])

    package, transformers = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    transformers.LigerFusedLinearCrossEntropyLoss = FakeLigerLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers)
    monkeypatch.setattr(H, "liger_unavailable_reason", lambda device_type: None)
    head = nn.Linear(24, 67)
    x, _, _, targets = tensors(bias=False)
    loss = head_loss_sum(head, x, targets, HeadLossSettings("liger"))
    assert seen == {"ignore_index": IGNORE_INDEX, "reduction": "sum", "accum_dtype": torch.float32}
    assert_relative(loss.detach(), token_loss_sum(head(x), targets).detach(), what="loss")


def test_recipe_settings():
    config = load_config(None, ["optim.loss_impl=chunked", "optim.loss_chunk_tokens=512"])
    assert HeadLossSettings.from_config(config.optim) == HeadLossSettings("chunked", 512)
    assert HeadLossSettings.from_config(load_config().optim) == HeadLossSettings()
    with pytest.raises(ConfigError, match="optim.loss_impl"):
        load_config(None, ["optim.loss_impl=fused"])
    with pytest.raises(ConfigError, match="optim.loss_chunk_tokens"):
        load_config(None, ["optim.loss_chunk_tokens=0"])


def test_auto_chunks_only_where_that_saves_memory():
    """A trained head's float32 weight-gradient accumulator is a fixed cost of the chunked loss: with Qwen2.5-7B's
    head trained in bf16, "auto" keeps the (faster) full logits up to ~1.9k supervised tokens, where the two
    peaks cross (train/loss_memory.py); a frozen head has no accumulator and chunks from the threshold on."""
    from mlcd_vl.train.loss_memory import chunked_loss_bytes, loss_bytes

    head = nn.Linear(3584, 151936, bias=False, device="meta", dtype=torch.bfloat16)
    auto = HeadLossSettings("auto")
    trained = H.HeadInputs(weight_bytes=2, hidden_bytes=2, head_trains=True, hidden_needs_grad=True)
    frozen = H.HeadInputs(weight_bytes=2, hidden_bytes=2, head_trains=False, hidden_needs_grad=True)

    def peaks(tokens, inputs):
        chunked = chunked_loss_bytes(tokens, 151936, 3584, 1024, weight_bytes=2, activation_bytes=2,
                                     head_trains=inputs.head_trains, hidden_needs_grad=True)
        return chunked, loss_bytes(tokens, 151936)

    crossing = next(n for n in range(1025, 4096) if peaks(n, trained)[0] < peaks(n, trained)[1])
    assert 1800 < crossing < 2000
    choose = H.choose_implementation
    assert choose(auto, crossing - 1, head, "cuda", trained) == "full"
    assert choose(auto, crossing, head, "cuda", trained) == "chunked"
    assert choose(auto, 1025, head, "cuda", frozen) == "chunked" and choose(auto, 1024, head, "cuda", frozen) == "full"
    # the forced paths ignore memory
    assert choose(HeadLossSettings("chunked"), 1025, head, "cuda", trained) == "chunked"
    # the inputs are read from the tensors training hands over
    real = nn.Linear(8, 16).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.zeros(3, 8, requires_grad=True)
    assert H.HeadInputs.of(real, hidden) == H.HeadInputs(2, 4, False, True)
