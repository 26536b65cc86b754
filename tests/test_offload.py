"""`device_map="auto"` with a `max_memory` too small for the whole composite: accelerate puts what does not fit on
disk (`offload_folder`) and loads each offloaded module only for its own forward. Whatever part lands there (LLM
layers with their routed factors, an encoder, a projector with prefix/suffix tokens or a Q-Former, the LM head, or the
whole model), logits and greedy generation must equal the model loaded whole.

On a CPU-only machine the CPU is the execution device, so "offloaded" means disk here. Beside an accelerator,
modules mapped to "cpu" take the same path (accelerate's offload hooks, with the weights kept in CPU memory instead
of read from disk); that case needs a GPU and is not run by this suite."""

import pytest
import torch

from composition.saving import save_composite
from fixtures.tiny_composite import build_tiny_composite, tiny_inputs
from modeling_composite import CompositeMLLMForCausalLM


PROMPT = "USER: <image> <video> <audio> <point> What do they share? ASSISTANT:"
# Budgets as fractions of the composite's weight bytes, each offloading another set of parts: all of them, the LLM's
# last layer and everything after it, every encoder and projector and the LM head, only the projectors and the LM
# head. The test checks that together they offload every part beside parts kept in memory.
BUDGETS = (0.0, 0.56, 0.62, 0.97)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-modality DAMC composite (audio through a Q-Former projector) saved whole, its inputs, its logits and its
    greedy continuation."""
    qformer = {
        "projector": "qformer_2N_1L",
        "projector_options": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
    }
    model, processor = build_tiny_composite(spec_overrides={"audio": qformer})
    folder = tmp_path_factory.mktemp("offload") / "composite"
    save_composite(model, processor, folder)
    raw = tiny_inputs()
    batch = processor(
        text=PROMPT, images=[raw["image"]], videos=[raw["video"]], audio=[raw["audio"]], point_clouds=[raw["point"]]
    )
    whole = CompositeMLLMForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = whole(**batch).logits
        generated = whole.generate(**batch, max_new_tokens=4, do_sample=False)
    size = sum(parameter.numel() * parameter.element_size() for parameter in whole.parameters())
    return folder, batch, logits, generated, size


def _parts(model: CompositeMLLMForCausalLM) -> list[str]:
    """The parts that should each land on disk under some budget: LLM layers, every encoder and projector, LM head."""
    inner = model.model
    return (
        ["model.language_model.layers", "lm_head"]
        + [f"model.encoders.{name}" for name in inner.encoders]
        + [f"model.projectors.{name}" for name in inner.projectors]
    )


def test_offloaded_parts_give_the_logits_of_the_whole_model(saved, tmp_path):
    folder, batch, expected, generated, size = saved
    on_disk: set[str] = set()
    llm_split = False
    for index, share in enumerate(BUDGETS):
        model = CompositeMLLMForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": int(share * size)}, offload_folder=tmp_path / str(index)
        ).eval()
        placement = model.hf_device_map
        disk = [name for name, device in placement.items() if device == "disk"]
        assert disk, f"budget {share}: nothing was offloaded ({placement})"
        with torch.no_grad():
            torch.testing.assert_close(
                model(**batch).logits,
                expected,
                rtol=0,
                atol=1e-5,
                msg=lambda text: f"budget {share}, on disk {disk}: {text}",
            )
        if disk != [""]:  # a part offloaded beside others kept in memory
            on_disk.update(
                part
                for part in _parts(model)
                for name in disk
                if name == part or name.startswith(part + ".") or part.startswith(name + ".")
            )
        layers = {device for name, device in placement.items() if name.startswith("model.language_model.layers")}
        if layers == {"cpu", "disk"}:
            llm_split = True
            with torch.no_grad():
                assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), generated)
    assert on_disk == set(_parts(model)), f"never offloaded beside parts in memory: {set(_parts(model)) - on_disk}"
    assert llm_split, "no budget split the LLM's layers between memory and disk"
