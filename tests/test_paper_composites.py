"""The paper's own composites end to end, on tiny checkpoints in the released layouts: four unimodal
`Adu2021/ModelCompose` sources (vision, audio, video, point) and the encoders they name (CLIP, BEATs, LanguageBind
video, PointBERT) go through the converter into one composite that loads with the auto classes in a fresh process,
and every modality reaches the LLM as the paper's code would feed it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import remote_code_python, run_fresh_python
from transformers import AutoProcessor

from composition.chat_template import VICUNA_V1_SYSTEM
from conversion import compose
from conversion.encoder_beats import read_beats_encoder
from conversion.encoder_languagebind import read_languagebind_video_encoder
from conversion.encoder_pointbert import read_pointbert_encoder
from conversion.errors import ConversionError
from conversion.paper_cards import CARDS, paper_notes, render_cards
from conversion.recipe import load_recipe
from fixtures import tiny_sources as make
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM, build_encoder


RECIPES = Path(__file__).resolve().parent.parent / "conversion" / "recipes"
PAPER_NAME = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}


@pytest.fixture(scope="module")
def paper_world(tmp_path_factory):
    """A tiny base, the paper's four DAMC (and NaiveMC) unimodal checkpoints on it, and their encoders."""
    root = tmp_path_factory.mktemp("paper")
    # Room for all four inputs at once (PointBERT alone fills 513 positions, as in the paper).
    base = make.save_tiny_base(root / "base", max_position_embeddings=1024)
    encoders = {
        "image": make.save_tiny_clip(root / "clip"),
        "audio": make.save_tiny_beats(root / "encoders" / "BEATs_iter3_plus_AS2M.pt"),
        "video": make.save_tiny_languagebind_video(root / "LanguageBind_Video_merge"),
        "point": make.save_tiny_pointbert(root / "encoders" / "point_bert_v1.2.pt"),
    }
    sources = {
        (kind, method): make.save_tiny_modelcompose(
            root / f"{PAPER_NAME[kind]}-{method}", kind=kind, method=method, base_folder=base, seed=30 + index
        )
        for index, (kind, method) in enumerate((k, m) for k in encoders for m in ("damc", "naive"))
    }
    return root, base, encoders, sources


def _recipe(paper_world, method: str, kinds=("image", "audio", "video", "point")) -> dict:
    root, base, encoders, sources = paper_world
    return {
        "name": f"tiny-{method}",
        "method": method,
        "base": str(base),
        "chat_template": "vicuna_v1",
        "sources": [
            {
                "path": str(sources[kind, "damc" if method == "damc" else "naive"]),
                "format": "modelcompose",
                "encoder": str(encoders[kind]),
            }
            for kind in kinds
        ],
    }


def _convert(recipe: dict, output: Path):
    """Convert, then load the composite in this process (package classes; the processor's BEATs feature extractor
    is remote code of the folder)."""
    compose(recipe, output, verify=False)
    model = CompositeMLLMForCausalLM.from_pretrained(output).eval()
    return model, AutoProcessor.from_pretrained(output, trust_remote_code=True)


def _inputs(processor, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    video = (rng.random((5, 36, 36, 3)) * 255).astype(np.uint8)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    points = rng.standard_normal((8192, 6)).astype(np.float32)
    prompt = "image: <image>\naudio: <audio>\nvideo: <video>\npoint: <point>\nWhat do they share?"
    text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return processor(
        text=[text], images=[image], videos=[video], audio=[audio], point_clouds=[points], return_tensors="pt"
    )


def test_every_released_recipe_parses_and_names_the_papers_sources():
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) == 10
    for path in recipes:
        recipe = load_recipe(path)
        tag = "damc" if recipe.method == "damc" else "naivemc"
        assert path.stem.startswith(tag) and recipe.base == "lmsys/vicuna-7b-v1.5"
        assert recipe.chat_template == "vicuna_v1" and recipe.merge.rule == "linear"
        kinds = path.stem.split("-")[1:]
        assert [source.path for source in recipe.sources] == [
            f"Adu2021/ModelCompose/multimodal-vicuna-7b-v1.5-{PAPER_NAME[kind]}-{tag}" for kind in kinds
        ]
        assert all(source.format == "modelcompose" and source.encoder for source in recipe.sources)


# The paper's encoders (BEATs with its fbank, LanguageBind video, PointBERT) are remote code too: the DAMC composite
# also loads under the oldest supported transformers.
@pytest.mark.parametrize("method, environment", [("damc", "current"), ("naive", "current"), ("damc", "oldest")])
def test_four_modality_composite_converts_and_runs_in_a_fresh_process(paper_world, tmp_path, method, environment):
    python = remote_code_python(environment)
    output = tmp_path / "composite"
    model, processor = _convert(_recipe(paper_world, method), output)
    config = model.config
    # The paper's token budget per item, at tiny size: CLIP patches without CLS; every LanguageBind token of every
    # frame (CLS kept); the Q-Former's queries; PointBERT's groups + CLS; plus 2 + 2 learnable tokens for DAMC.
    side = 4 if method == "damc" else 0
    assert {name: config.positions_per_item(name) for name in config.modalities} == {
        "image": 16 + side,
        "audio": 4 + side,
        "video": 2 * 17 + side,
        "point": 513 + side,
    }
    assert config.modalities["audio"].projector == "qformer_4N_1L"
    assert config.modalities["audio"].tokens_per_item == 512  # BEATs tokens the Q-Former reads
    assert all((entry.lora is not None) == (method == "damc") for entry in config.modalities.values())
    batch = _inputs(processor)
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text.startswith(VICUNA_V1_SYSTEM + " USER: image: ") and text.endswith("What do they share? ASSISTANT:")
    with torch.no_grad():
        reference = model(**batch).logits
    torch.save({"batch": dict(batch), "logits": reference}, tmp_path / "reference.pt")
    script = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder, saved = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    logits = model(**saved["batch"]).logits
print(type(processor.feature_extractor).__name__, (logits - saved["logits"]).abs().max().item())
"""
    # The converted composite's card says what the paper's encoders are and where preprocessing differs.
    card = (output / "README.md").read_text()
    assert all(note in card for note in paper_notes(["image", "audio", "video", "point"]))
    out = run_fresh_python(script, str(output), str(tmp_path / "reference.pt"), hf_home=tmp_path, python=python)
    extractor, difference = out.split()
    assert extractor == "CompositeBeatsFeatureExtractor" and float(difference) == 0.0


FOUR_BIT = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
folder, saved = sys.argv[1], torch.load(sys.argv[2])
batch = {name: value.to(torch.bfloat16) if value.is_floating_point() else value
         for name, value in saved["batch"].items()}
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, quantization_config=quantization)
full = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
quantized = sorted({".".join(name.split(".")[:2]) for name, module in model.model.named_modules()
                    if type(module).__name__ == "Linear4bit" and name.startswith(("encoders.", "projectors."))})
with torch.no_grad():
    a, b = model(**batch).logits.float().flatten(), full(**batch).logits.float().flatten()
new = model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] - batch["input_ids"].shape[1]
print(",".join(quantized), torch.nn.functional.cosine_similarity(a, b, dim=0).item(), new)
"""


def test_four_modality_composite_loads_and_generates_in_4bit(paper_world, tmp_path, remote_python):
    output = tmp_path / "composite"
    model, processor = _convert(_recipe(paper_world, "damc"), output)
    torch.save({"batch": dict(_inputs(processor))}, tmp_path / "batch.pt")
    quantized, cosine, new_tokens = run_fresh_python(
        FOUR_BIT, str(output), str(tmp_path / "batch.pt"), hf_home=tmp_path, python=remote_python
    ).split()
    # Every encoder and projector has 4-bit linears (BEATs, the Q-Former, LanguageBind, PointBERT, CLIP, MLPs).
    assert quantized == ",".join(
        f"{part}.{kind}" for part in ("encoders", "projectors") for kind in ("audio", "image", "point", "video")
    )
    assert float(cosine) > 0.9 and int(new_tokens) == 3


def test_each_modality_reaches_the_llm_as_the_papers_pipeline_makes_it(paper_world, tmp_path):
    """Composite features of each modality == its encoder (read straight from the released file) -> the paper's
    feature selection -> its projector (read straight from the unimodal checkpoint) -> prefix / suffix."""
    root, base, encoders, sources = paper_world
    model, processor = _convert(_recipe(paper_world, "damc"), tmp_path / "composite")
    batch = _inputs(processor)
    readers = {"audio": read_beats_encoder, "video": read_languagebind_video_encoder, "point": read_pointbert_encoder}
    inputs = {"audio": batch["input_features"], "video": batch["pixel_values_videos"], "point": batch["point_clouds"]}
    for kind, reader in readers.items():
        encoder_files = reader(str(encoders[kind]), kind)
        encoder = build_encoder(encoder_files.config).eval()
        encoder.load_state_dict({name: lazy.load() for name, lazy in encoder_files.weights.items()}, strict=True)
        state = torch.load(sources[kind, "damc"] / "adapter_model.bin", weights_only=True)
        prefix = state[f"prefix_tokens.{PAPER_NAME[kind]}"][0]
        suffix = state[f"suffix_tokens.{PAPER_NAME[kind]}"][0]
        with torch.no_grad():
            if kind == "video":  # the paper: hidden_states[-2] of (b, t, 257, d), flattened over frames, CLS kept
                features = encoder(inputs[kind], output_hidden_states=True).hidden_states[-2]
                features = features.reshape(1, -1, features.shape[-1])
            else:
                features = encoder(inputs[kind]).last_hidden_state
            if kind == "audio":
                projected = _paper_qformer(state, features)
            else:
                projector = "model.modal_projectors." + PAPER_NAME[kind]
                hidden = features @ state[f"{projector}.0.weight"].T + state[f"{projector}.0.bias"]
                hidden = torch.nn.functional.gelu(hidden)
                projected = hidden @ state[f"{projector}.2.weight"].T + state[f"{projector}.2.bias"]
            expected = torch.cat([prefix[None], projected, suffix[None]], dim=1)
            actual = model.model.get_modality_features(kind, inputs[kind])
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _paper_qformer(state: dict, features: torch.Tensor) -> torch.Tensor:
    """The paper's audio projector, written from its checkpoint's tensors with transformers' BLIP-2 Q-Former."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    prefix = "model.modal_projectors.audio."
    queries = state[prefix + "audio_query_tokens"]
    hidden = queries.shape[-1]
    config = Blip2QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=12,
        intermediate_size=64,
        cross_attention_frequency=1,
        encoder_hidden_size=features.shape[-1],
        use_qformer_text_input=False,
        attn_implementation="eager",
    )
    qformer = Blip2QFormerModel(config).eval()
    renamed = {}
    for key, tensor in state.items():
        if key.startswith(prefix + "audio_Qformer.bert."):
            name = key[len(prefix + "audio_Qformer.bert.") :].replace(".self.", ".attention.")
            renamed[name.replace("embeddings.LayerNorm", "layernorm")] = tensor
    qformer.load_state_dict(renamed, strict=True)
    positions = state[prefix + "audio_position_embedding.weight"][: features.shape[1]]
    output = qformer(query_embeds=queries, encoder_hidden_states=features + positions).last_hidden_state
    return output @ state[prefix + "audio_llama_proj.weight"].T + state[prefix + "audio_llama_proj.bias"]


def test_a_recipe_without_the_encoder_of_a_paper_modality_fails_naming_it(paper_world, tmp_path):
    recipe = _recipe(paper_world, "damc", kinds=("audio",))
    del recipe["sources"][0]["encoder"]
    with pytest.raises(ConversionError, match="BEATs"):
        compose(recipe, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


def test_the_paper_composites_model_cards_are_current():
    """model_cards/paper/ is rendered from the recipes; `python -m conversion.paper_cards` rewrites it."""
    cards = render_cards()
    assert len(cards) == 10
    for path, text in cards.items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.name} is stale: run python -m conversion.paper_cards"
        )
    damc = cards[CARDS / "damc-image-audio-video-point.md"]
    assert "| `video` | video | `composite_languagebind_video` | `<video>` | 2066 | 128 |" in damc
    assert "| `audio` | audio | `composite_beats` | `<audio>` | 42 | 128 |" in damc
    naive = cards[CARDS / "naivemc-image-audio-video.md"]
    assert (
        "| `image` | image | `clip_vision_model` | `<image>` | 576 | - |" in naive
        and "point" not in naive.split("## Sources")[0]
    )


def test_a_composite_with_the_papers_audio_grows_by_another_source(paper_world, tmp_path):
    """A converted composite (its processor holds BEATs' feature extractor, remote code of its folder) is itself a
    source: the installed package reads it without running that code, and its audio path carries over unchanged."""
    root, base, encoders, sources = paper_world
    first, _ = _convert(_recipe(paper_world, "damc", kinds=("audio",)), tmp_path / "first")
    vision = {"path": str(sources["image", "damc"]), "format": "modelcompose", "encoder": str(encoders["image"])}
    grown, processor = _convert(
        {"method": "damc", "base": str(base), "sources": [{"path": str(tmp_path / "first")}, vision]},
        tmp_path / "grown",
    )
    assert list(grown.config.modalities) == ["audio", "image"]
    features = processor.feature_extractor(
        [np.zeros(8000, dtype=np.float32)], sampling_rate=16000, return_tensors="pt"
    )["input_features"]
    with torch.no_grad():
        torch.testing.assert_close(
            grown.model.get_modality_features("audio", features),
            first.model.get_modality_features("audio", features),
            rtol=0,
            atol=0,
        )
