"""The PEFT and composite source formats: a PEFT LoRA becomes `W0 + s B A`; composites of ours can be re-weighted and
grown, and growing a composite gives the same model as composing its sources directly."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel, SiglipImageProcessorPil

from composition.image_processor import clip_image_processor
from conversion import compose
from conversion.composer import image_processor_overrides
from conversion.detect import detect_format
from conversion.formats import FORMAT_DEPENDENT_KEYS, SOURCE_FORMATS
from conversion.locate import Location
from conversion.recipe import SourceRecipe
from modeling_composite import CompositeMLLMForCausalLM, CompositeMLLMProcessor


def test_peft_lora_with_projector_and_encoder(tiny_sources, tmp_path):
    peft, clip = tiny_sources["peft"], tiny_sources["clip"]
    recipe = {"base": str(tiny_sources["base"]), "sources": [{"path": str(peft), "encoder": str(clip), "weight": 1.0}]}
    output = compose(recipe, tmp_path / "out", verify=False)
    state = load_file(str(output / "model.safetensors"))
    adapter = load_file(str(peft / "adapter_model.safetensors"))
    base = load_file(str(tiny_sources["base"] / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    prefix = f"base_model.model.{key}"
    expected = base[f"{key}.weight"] + 2.0 * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    torch.testing.assert_close(
        state["model.language_model.layers.0.mlp.down_proj.weight"], expected, rtol=0, atol=1e-6
    )
    projector = load_file(str(peft / "mm_projector.safetensors"))
    assert torch.equal(state["model.projectors.image.linear_2.weight"], projector["model.mm_projector.2.weight"])
    clip_state = load_file(str(clip / "model.safetensors"))
    assert torch.equal(
        state["model.encoders.image.embeddings.patch_embedding.weight"],
        clip_state["vision_model.embeddings.patch_embedding.weight"],
    )


def test_a_vision_tower_saved_alone_reads_as_the_same_tower_inside_clip(tiny_sources, tmp_path):
    """`encoder:` may name the vision tower alone as current transformers saves it (keys without `vision_model.`)."""
    clip = tiny_sources["clip"]
    tower = tmp_path / "tower"
    CLIPVisionModel.from_pretrained(clip).save_pretrained(tower, save_original_format=False)
    shutil.copy(clip / "preprocessor_config.json", tower)
    assert not any(key.startswith("vision_model.") for key in load_file(str(tower / "model.safetensors")))
    outputs = {}
    for label, encoder in (("inside clip", clip), ("alone", tower)):
        source = {"path": str(tiny_sources["peft"]), "encoder": str(encoder)}
        recipe = {"base": str(tiny_sources["base"]), "sources": [source]}
        outputs[label] = load_file(str(compose(recipe, tmp_path / label, verify=False) / "model.safetensors"))
    assert outputs["alone"].keys() == outputs["inside clip"].keys()
    for key, tensor in outputs["inside clip"].items():
        assert torch.equal(outputs["alone"][key], tensor), key


def test_reweighting_a_naive_composite_scales_its_text_delta(tiny_sources, tmp_path):
    base = str(tiny_sources["base"])
    first = compose(
        {
            "base": base,
            "sources": [
                str(tiny_sources["llava"]),
                {"path": str(tiny_sources["llava_2"]), "rename": {"image": "chart"}},
            ],
        },
        tmp_path / "first",
        verify=False,
    )
    again = compose({"base": base, "sources": [{"path": str(first), "weight": 0.5}]}, tmp_path / "again", verify=False)
    base_state = load_file(str(tiny_sources["base"] / "model.safetensors"))
    key = "layers.1.self_attn.v_proj.weight"
    merged = load_file(str(first / "model.safetensors"))[f"model.language_model.{key}"]
    reweighted = load_file(str(again / "model.safetensors"))[f"model.language_model.{key}"]
    torch.testing.assert_close(
        reweighted, base_state[f"model.{key}"] + 0.5 * (merged - base_state[f"model.{key}"]), rtol=0, atol=1e-6
    )


def test_growing_a_damc_composite_equals_composing_its_sources(tiny_sources, tmp_path):
    base, clip = str(tiny_sources["base"]), str(tiny_sources["clip"])
    image_source = {"path": str(tiny_sources["paper_damc_a"]), "encoder": clip}
    chart_source = {
        "path": str(tiny_sources["paper_damc_b"]),
        "encoder": clip,
        "rename": {"image": "chart"},
        "weight": 0.5,
    }
    alone = compose(
        {"method": "damc", "base": base, "sources": [{**image_source, "weight": 1.0}]},
        tmp_path / "alone",
        verify=False,
    )
    grown = compose(
        {"method": "damc", "base": base, "sources": [{"path": str(alone), "weight": 0.5}, chart_source]},
        tmp_path / "grown",
        verify=False,
    )
    direct = compose(
        {"method": "damc", "base": base, "sources": [{**image_source, "weight": 0.5}, chart_source]},
        tmp_path / "direct",
        verify=False,
    )
    processor = CompositeMLLMProcessor.from_pretrained(direct)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(text="USER: <image> and <chart>: alike? ASSISTANT:", images=images)
    with torch.no_grad():
        expected = CompositeMLLMForCausalLM.from_pretrained(direct).eval()(**batch).logits
        got = CompositeMLLMForCausalLM.from_pretrained(grown).eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_siglip_sources_images_are_processed_as_its_own_processor_does_beside_a_clip_source():
    """The composite keeps one (CLIP) image processor; a SigLIP modality's overrides must reproduce SigLIP's own
    preprocessing (a plain resize to its square, no centre crop), whichever source came first."""
    clip_processor = clip_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    siglip = SiglipImageProcessorPil(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    overrides = image_processor_overrides(clip_processor.to_dict(), siglip.to_dict())
    assert overrides["do_center_crop"] is False
    as_composite = clip_processor(picture, **overrides, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(as_composite, siglip(picture, return_tensors="np")["pixel_values"], atol=1e-6)
    # The other way round (SigLIP's processor shared), CLIP's images keep their crop.
    back = image_processor_overrides(siglip.to_dict(), clip_processor.to_dict())
    as_composite = siglip(picture, **back, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(as_composite, clip_processor(picture, return_tensors="np")["pixel_values"], atol=1e-6)


@pytest.mark.parametrize(
    "name, folder",
    [
        ("llava", "llava"),
        ("video_llava", "video_llava"),
        ("qwen2_audio", "qwen2_audio"),
        ("modelcompose", "paper_damc_a"),
        ("peft", "peft"),
    ],
)
def test_each_format_entry_identifies_its_folders_and_reads_them(name, folder, tiny_sources):
    """A source format is one registry entry: its files identify it (no `format:` needed) and its reader reads it."""
    recipe = SourceRecipe(
        path=str(tiny_sources[folder]), encoder=str(tiny_sources["clip"]) if name in ("peft", "modelcompose") else None
    )
    location = Location(folder=tiny_sources[folder], reference=str(tiny_sources[folder]))
    assert detect_format(recipe, location) == name
    assert SOURCE_FORMATS[name].read(recipe, location).format == name
    assert set(SOURCE_FORMATS[name].recipe_keys) <= set(FORMAT_DEPENDENT_KEYS)
