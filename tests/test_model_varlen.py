"""`sdpa_varlen` on a tiny Qwen2: packed rows equal their samples run alone, padded batches and cached generation
equal plain SDPA, and bad boundaries are refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mlcd_vl.data.packing import block_causal_mask
from mlcd_vl.model.varlen import VARLEN_ATTENTION, composite_attention, padding_to_causal_mask, sample_bounds


@pytest.fixture(scope="module")
def lm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # grouped-query heads, as Qwen2.5
    return Qwen2ForCausalLM(config).eval()


def packed_row(lengths: list[int], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 300, (n,), generator=generator) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    return samples, torch.cat(samples)[None], positions, cu


def test_packed_row_equals_samples_alone_forward_and_backward(lm):
    lengths = [5, 9, 1, 7, 2]
    samples, row, positions, cu = packed_row(lengths)
    lm.set_attn_implementation("sdpa")
    alone = torch.cat([lm(input_ids=s[None]).logits[0] for s in samples])
    block = lm(input_ids=row, position_ids=positions, attention_mask=block_causal_mask(lengths)).logits[0]
    lm.set_attn_implementation(VARLEN_ATTENTION)
    varlen = lm(input_ids=row, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                max_length_k=9).logits[0]
    by_positions = lm(input_ids=row, position_ids=positions).logits[0]
    torch.testing.assert_close(varlen, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(varlen, block, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_positions, varlen, atol=0, rtol=0)

    def grads(**kwargs):
        lm.zero_grad(set_to_none=True)
        lm(input_ids=row, position_ids=positions, **kwargs).logits.square().mean().backward()
        return {name: p.grad.clone() for name, p in lm.named_parameters()}

    with_varlen = grads(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    lm.set_attn_implementation("sdpa")
    with_block = grads(attention_mask=block_causal_mask(lengths))
    for name, grad in with_block.items():
        torch.testing.assert_close(with_varlen[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_padded_batches_and_cached_generation_equal_sdpa(lm):
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3], mask[2, :1] = 0, 0  # left padding, as in batched generation
    results = {}
    for attention in ("sdpa", VARLEN_ATTENTION):
        lm.set_attn_implementation(attention)
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=mask).logits
            generated = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        results[attention] = logits, generated
    torch.testing.assert_close(results[VARLEN_ATTENTION][0][mask.bool()], results["sdpa"][0][mask.bool()],
                               atol=1e-5, rtol=0)
    assert torch.equal(results[VARLEN_ATTENTION][1], results["sdpa"][1])


def test_boundaries_are_checked(lm):
    samples, row, positions, cu = packed_row([4, 4])
    lm.set_attn_implementation(VARLEN_ATTENTION)
    with pytest.raises(ValueError, match="must split one packed row"):
        lm(input_ids=row, position_ids=positions, cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1])
    with pytest.raises(ValueError, match="no padding mask"):
        lm(input_ids=row, attention_mask=torch.ones_like(row).index_fill_(1, torch.tensor([0]), 0),
           cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_helpers():
    assert sample_bounds(None, torch.tensor([[0, 1, 2, 0, 1, 0]]), 1, 6) == [[0, 3, 5, 6]]
    assert sample_bounds(None, torch.arange(6)[None], 1, 6) is None  # one sample: ordinary causal attention
    assert sample_bounds(torch.tensor([0, 2, 6]), None, 1, 6) == [[0, 2, 6]]
    mask = padding_to_causal_mask(torch.tensor([[0, 1, 1]]), 3)[0, 0]
    assert mask.tolist() == [[True, True, True], [False, True, False], [False, True, True]]  # pad row: all keys
    assert composite_attention("sdpa", packing=False) == "sdpa"
    assert composite_attention("sdpa", packing=True) == {"": "sdpa", "text_config": VARLEN_ATTENTION}
    assert composite_attention("flash_attention_2", packing=True) == "flash_attention_2"


def test_saved_config_does_not_carry_the_training_attention(lm, tmp_path):
    lm.set_attn_implementation(VARLEN_ATTENTION)
    lm.save_pretrained(tmp_path)
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn" not in " ".join(json.loads((tmp_path / "config.json").read_text()))
