"""`mlcd-vl convert` (mlcd_vl.model.convert): round trips, stage-1 artefacts, tower resolution, errors, CLI.

* upstream -> HF-native -> upstream gives back every safetensors tensor bit for bit, the config fields, the
  generation config and a tokenizer that tokenises identically (all three stage-2 checkpoints of the manifest);
* HF-native -> upstream -> HF-native is bit-exact too, and the logits do not move;
* stage-1: HF-native -> --projector-only gives back upstream's mm_projector.bin tensors; the base LLM resolves from
  `_name_or_path` next to the artefact;
* errors name the pickle flag, the missing / mis-shaped / unplaceable key, the unresolvable tower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upstream_utils as U
from mlcd_vl.model import convert as C
from mlcd_vl.model.checkpoint import load_vlm

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def _tower_folder(vectors_dir: Path, manifest: dict, name: str) -> Path:
    return U.tower_folder(vectors_dir, manifest, name)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: {key} dtype {a[key].dtype} vs {b[key].dtype}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _without_version(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "transformers_version"}


def _first_image_sample(manifest: dict, name: str) -> str:
    return next(s for s, sample in manifest["models"][name]["samples"].items() if sample["images"])


def _logits(folder_or_model, vectors_dir, manifest, name, sample_id) -> torch.Tensor:
    model, _, settings = folder_or_model
    vectors = U.load_vectors(vectors_dir, manifest, name)
    sample = manifest["models"][name]["samples"][sample_id]
    return U.run_sample(model, settings, vectors[f"{sample_id}/input_ids"],
                        U.sample_images(vectors_dir, sample, settings)).logits


# --------------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_hf_upstream_round_trip_is_bit_exact(vectors_dir, manifest, tmp_root):
    from transformers import AutoTokenizer

    for name in U.stage2_models(manifest):
        source = vectors_dir / manifest["models"][name]["path"]
        hf = U.converted(tmp_root, vectors_dir, manifest, name)
        back = C.convert(hf, tmp_root / f"up_{name}", log=U.quiet)
        assert C.detect_format(back) == "upstream"
        _assert_same_tensors(C.read_state_dict(source, allow_pickle=False),
                             C.read_state_dict(back, allow_pickle=False), name)
        original, written = (json.loads((f / "config.json").read_text()) for f in (source, back))
        assert _without_version(written) == _without_version(original)
        original, written = (json.loads((f / "generation_config.json").read_text()) for f in (source, back))
        assert _without_version(written) == _without_version(original)
        for file in ("vocab.json", "added_tokens.json", "special_tokens_map.json"):
            if (source / file).is_file():
                assert json.loads((back / file).read_text()) == json.loads((source / file).read_text()), file
        if (source / "merges.txt").is_file():
            assert (back / "merges.txt").read_text().split() == (source / "merges.txt").read_text().split()
        tok_a, tok_b = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(back)
        assert len(tok_a) == len(tok_b)
        assert tok_a.all_special_tokens == tok_b.all_special_tokens
        texts = [s["text"] for s in manifest["models"][name]["samples"].values() if "text" in s]
        texts += [g["prompt"] for g in manifest["models"][name].get("generation", {}).values() if "prompt" in g]
        assert texts
        for text in texts:
            assert tok_a(text).input_ids == tok_b(text).input_ids


def test_hf_upstream_hf_round_trip_is_bit_exact_and_logits_equal(vectors_dir, manifest, tmp_root):
    for name in U.stage2_models(manifest):
        hf = U.converted(tmp_root, vectors_dir, manifest, name)
        up = tmp_root / f"up2_{name}"
        C.convert(hf, up, to="upstream", log=U.quiet)
        # The written folder names its tower by the upstream id; resolve it like upstream (--vision-tower here).
        again = C.convert(up, tmp_root / f"hf2_{name}", to="hf", log=U.quiet,
                          vision_tower=str(_tower_folder(vectors_dir, manifest, name)))
        _assert_same_tensors(load_file(str(hf / "model.safetensors")), load_file(str(again / "model.safetensors")),
                             name)
        assert (_without_version(json.loads((again / "config.json").read_text()))
                == _without_version(json.loads((hf / "config.json").read_text())))
        sample_id = _first_image_sample(manifest, name)
        before = _logits(U.loaded(hf), vectors_dir, manifest, name, sample_id)
        after = _logits(load_vlm(again, dtype=torch.float32), vectors_dir, manifest, name, sample_id)
        assert torch.equal(before, after)


def test_bfloat16_conversion_keeps_values_and_dtype(vectors_dir, manifest, tmp_root):
    name = U.stage2_models(manifest)[0]
    source = vectors_dir / manifest["models"][name]["path"]
    hf = C.convert(source, tmp_root / f"bf16_{name}", dtype="bfloat16", log=U.quiet)
    model, _, _ = load_vlm(hf, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    back = C.convert(hf, tmp_root / f"bf16_up_{name}", log=U.quiet)  # dtype auto: stays bfloat16
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original = C.read_state_dict(source, allow_pickle=False)
    _assert_same_tensors({k: v.to(torch.bfloat16) for k, v in original.items()},
                         C.read_state_dict(back, allow_pickle=False), name)


def test_stage1_projector_only_round_trip(vectors_dir, manifest, tmp_root):
    for name in U.stage1_models(manifest):
        source = vectors_dir / manifest["models"][name]["path"]
        hf = U.converted(tmp_root, vectors_dir, manifest, name)
        artefact = C.convert(hf, tmp_root / f"p_{name}", projector_only=True, log=U.quiet)
        original = torch.load(source / C.PROJECTOR_FILE, weights_only=True)
        _assert_same_tensors(original, torch.load(artefact / C.PROJECTOR_FILE, weights_only=True), name)
        written, upstream = (json.loads((f / "config.json").read_text()) for f in (artefact, source))
        assert written["architectures"] == upstream["architectures"]
        for key, value in upstream.items():
            if key.startswith(("mm_", "image_")):
                assert written.get(key) == value, key
        assert C.detect_format(artefact) == "stage1"
        # ... and it converts again, the base LLM found from _name_or_path relative to the vectors folder.
        again = C.convert(artefact, tmp_root / f"p_hf_{name}", allow_pickle=True, log=U.quiet,
                          vision_tower=str(_tower_folder(vectors_dir, manifest, name)),
                          base_llm=str(vectors_dir / U.base_llm_name(manifest, name, vectors_dir)))
        _assert_same_tensors(load_file(str(hf / "model.safetensors")), load_file(str(again / "model.safetensors")),
                             name)


def test_stage1_resolves_base_llm_and_tower_next_to_the_artefact(vectors_dir, manifest, tmp_root):
    name = U.stage1_models(manifest)[0]
    source = vectors_dir / manifest["models"][name]["path"]
    folder = C.convert(source, tmp_root / f"s1_auto_{name}", allow_pickle=True, log=U.quiet)
    _assert_same_tensors(load_file(str(U.converted(tmp_root, vectors_dir, manifest, name) / "model.safetensors")),
                         load_file(str(folder / "model.safetensors")), name)
    full = C.convert(folder, tmp_root / f"s1_full_{name}", log=U.quiet)  # a full LlavaQwen checkpoint
    config = json.loads((full / "config.json").read_text())
    assert config["architectures"] == [C.UPSTREAM_ARCHITECTURE] and config["model_type"] == "qwen2"
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("square", "flat")


# --------------------------------------------------------------------------------------------------------------------
# Tower resolution and errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def loose_copy(vectors_dir, manifest, tmp_path) -> tuple[Path, str]:
    """A stage-2 checkpoint copied away from the vectors folder (its tower no longer resolves next to it)."""
    name = U.stage2_models(manifest)[0]
    copy = tmp_path / "ckpt"
    shutil.copytree(vectors_dir / manifest["models"][name]["path"], copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy, name


def test_tower_resolves_relative_to_working_directory(loose_copy, vectors_dir, tmp_path, monkeypatch):
    copy, _ = loose_copy
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llava_qwen"  # what LlavaQwenConfig itself would have written
    (copy / "config.json").write_text(json.dumps(config))
    assert C.detect_format(copy) == "upstream"
    monkeypatch.chdir(vectors_dir)
    out = C.convert(copy, tmp_path / "out", log=U.quiet)
    assert json.loads((out / "config.json").read_text())["model_type"] in C.HF_MODEL_TYPES


def _rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(loose_copy, vectors_dir, manifest, tmp_path):
    copy, name = loose_copy
    state = load_file(str(copy / "model.safetensors"))
    victim = sorted(state)[len(state) // 2]
    _rewrite_weights(copy, lambda s: s.pop(victim))
    with pytest.raises(C.ConvertError, match="missing") as error:
        C.convert(copy, tmp_path / "out", vision_tower=str(_tower_folder(vectors_dir, manifest, name)), log=U.quiet)
    assert victim in str(error.value)


def test_misshaped_key_is_named(loose_copy, vectors_dir, manifest, tmp_path):
    copy, name = loose_copy
    victim = "model.mm_projector.0.weight"
    _rewrite_weights(copy, lambda s: s.__setitem__(victim, torch.zeros(s[victim].shape[0] + 1, s[victim].shape[1])))
    with pytest.raises(C.ConvertError, match="shape") as error:
        C.convert(copy, tmp_path / "out", vision_tower=str(_tower_folder(vectors_dir, manifest, name)), log=U.quiet)
    assert victim in str(error.value)


def test_unplaceable_key_is_named(loose_copy, vectors_dir, manifest, tmp_path):
    copy, name = loose_copy
    _rewrite_weights(copy, lambda s: s.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(C.ConvertError, match="model.extra_head.weight"):
        C.convert(copy, tmp_path / "out", vision_tower=str(_tower_folder(vectors_dir, manifest, name)), log=U.quiet)


def test_pickle_needs_explicit_permission(vectors_dir, manifest, tmp_path):
    name = U.stage1_models(manifest)[0]
    with pytest.raises(C.ConvertError, match="--allow-pickle"):
        C.convert(vectors_dir / manifest["models"][name]["path"], tmp_path / "out", log=U.quiet)


def test_direction_and_destination_checks(vectors_dir, manifest, tmp_root, tmp_path):
    name = U.stage2_models(manifest)[0]
    hf = U.converted(tmp_root, vectors_dir, manifest, name)
    with pytest.raises(C.ConvertError, match="not hf"):
        C.convert(hf, tmp_path / "a", to="hf", log=U.quiet)
    with pytest.raises(C.ConvertError, match="--projector-only"):
        C.convert(vectors_dir / manifest["models"][name]["path"], tmp_path / "b", projector_only=True, log=U.quiet)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(C.ConvertError, match="not empty"):
        C.convert(hf, tmp_path / "c", log=U.quiet)
    with pytest.raises(C.ConvertError, match="neither"):
        C.detect_format(vectors_dir / U.base_llm_name(manifest, U.stage1_models(manifest)[0], vectors_dir))


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys\nfrom mlcd_vl.cli import main\nsys.exit(main(['convert', *sys.argv[1:]]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_unknown_tower_offline_is_a_clear_error(loose_copy, tmp_path):
    copy, _ = loose_copy
    config = json.loads((copy / "config.json").read_text())
    config["mm_vision_tower"] = "no-such-org/no-such-tower-70"
    (copy / "config.json").write_text(json.dumps(config))
    result = _cli([str(copy), str(tmp_path / "out")], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no-such-org/no-such-tower-70" in result.stderr and "--vision-tower" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_lists_every_option():
    parser = argparse.ArgumentParser(prog="mlcd-vl convert")
    C.configure_parser(parser)
    text = parser.format_help()
    for flag in ("SRC", "DST", "--vision-tower", "--base-llm", "--allow-pickle", "--to", "--projector-only",
                 "--dtype"):
        assert flag in text
    args = parser.parse_args(["a", "b", "--to", "upstream", "--projector-only", "--dtype", "bfloat16"])
    assert (args.to, args.projector_only, args.dtype) == ("upstream", True, "bfloat16")


def test_full_vocabulary_gets_an_image_row_and_round_trips(loose_copy, vectors_dir, manifest, tmp_path):
    """When the tokenizer fills every embedding row, <image> gets an added row; the way back removes it."""
    from transformers import AutoTokenizer

    copy, name = loose_copy
    size = len(AutoTokenizer.from_pretrained(copy))
    _rewrite_weights(copy, lambda s: s.update({k: s[k][:size].clone() for k in ("model.embed_tokens.weight",
                                                                                 "lm_head.weight")}))
    config = json.loads((copy / "config.json").read_text())
    config["vocab_size"] = size
    (copy / "config.json").write_text(json.dumps(config))
    messages = []
    hf = C.convert(copy, tmp_path / "hf", vision_tower=str(_tower_folder(vectors_dir, manifest, name)),
                   log=messages.append)
    assert any("beyond the" in m for m in messages)
    model, tokenizer, settings = load_vlm(hf, dtype=torch.float32)
    assert model.config.image_token_id == size and model.config.text_config.vocab_size == size + 1
    sample_id = _first_image_sample(manifest, name)
    logits = _logits((model, tokenizer, settings), vectors_dir, manifest, name, sample_id)
    assert logits.shape[-1] == size + 1 and torch.isfinite(logits).all()
    back = C.convert(hf, tmp_path / "up", log=U.quiet)
    assert json.loads((back / "config.json").read_text()) == {**config, "transformers_version":
                                                               json.loads((back / "config.json").read_text())
                                                               ["transformers_version"]}
    _assert_same_tensors(C.read_state_dict(copy, allow_pickle=False), C.read_state_dict(back, allow_pickle=False),
                         name)


def test_model_built_here_converts_to_upstream_and_back(tmp_path):
    """A folder that never was upstream (built by us, tiny): upstream defaults fill the mm_* keys, the tower name
    that upstream would misroute is warned about, and the way back is bit-exact."""
    from mlcd_vl.model import tiny
    from mlcd_vl.model.build import VLMSpec, build_vlm
    from mlcd_vl.model.checkpoint import save_vlm

    assets = tiny.write_tiny_assets(tmp_path / "assets")
    spec = VLMSpec(llm=str(assets["llm"]), tower=str(assets["tower"]), image_mode="anyres_max_4",
                   merge_type="spatial_unpad", pinpoints="(1x1),...,(2x2)")
    model, tokenizer, settings = build_vlm(spec)
    folder = save_vlm(model, tokenizer, settings, tmp_path / "ours")
    messages = []
    up = C.convert(folder, tmp_path / "up", log=messages.append)
    config = json.loads((up / "config.json").read_text())
    assert config["image_aspect_ratio"] == "anyres_max_4" and config["mm_patch_merge_type"] == "spatial_unpad"
    assert config["image_grid_pinpoints"] == [list(p) for p in settings.pinpoints]
    assert config["mm_vision_tower"] == str(assets["tower"]) and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_hidden_size"] == model.config.vision_config.hidden_size
    assert any("mlcd-vit-bigG-patch14" in m for m in messages)  # upstream would load it as a CLIP tower
    again = C.convert(up, tmp_path / "again", log=U.quiet)  # the tower resolves: mm_vision_tower is its path
    _assert_same_tensors(load_file(str(folder / "model.safetensors")), load_file(str(again / "model.safetensors")),
                         "built")
    back, _, back_settings = load_vlm(again, dtype=torch.float32)
    assert back_settings.pinpoints == settings.pinpoints and back_settings.image_mode == settings.image_mode
