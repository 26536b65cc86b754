"""The model card of a converted composite: Hub metadata, the tables that say what went in, the usage snippet and
the recipe. Offline and fast: the card is only rendered and parsed, never validated against the Hub."""

import ast
import dataclasses
import re

import pytest
from huggingface_hub import ModelCard

from conversion import card as card_module
from conversion.card import CardInfo, CardSource, render_model_card, template_path
from conversion.errors import ConversionError


BASE_ID = "lmsys/vicuna-7b-v1.5"
HUB_SOURCE_ID = "org/llava-damc"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"
LOCAL_SOURCE = "./checkpoints/audio-source"
RECIPE = """name: vision-audio
method: damc
base: lmsys/vicuna-7b-v1.5@abc123
merge: {rule: linear}
sources:
  - path: org/llava-damc@0123456789abcdef0123456789abcdef01234567
    weight: 0.5
  - path: ./checkpoints/audio-source   # trained here
    weight: 0.25
"""


def make_info(**changes) -> CardInfo:
    """A DAMC composite of a Hub base, one Hub source (pinned) and one local source, with an image and an audio
    modality."""
    info = CardInfo(
        name="vision-audio",
        method="damc",
        rule="linear",
        density=None,
        seed=0,
        base=CardSource(BASE_ID, BASE_ID, "abc123", "llava", {}, 1.0),
        sources=[
            CardSource(HUB_SOURCE_ID, HUB_SOURCE_ID, HUB_REVISION, "modelcompose", {"image": "image"}, 0.5),
            CardSource(LOCAL_SOURCE, None, None, "peft", {"speech": "audio"}, 0.25),
        ],
        modalities={
            "image": {
                "kind": "image",
                "encoder": "clip_vision_model",
                "placeholder": "<image>",
                "positions_per_item": 578,
                "lora_rank": 64,
            },
            "speech": {
                "kind": "audio",
                "encoder": "whisper",
                "placeholder": "<audio>",
                "positions_per_item": 34,
                "lora_rank": 32,
            },
        },
        recipe_yaml=RECIPE,
        repo_id="org/vision-audio-composite",
        license="apache-2.0",
    )
    return dataclasses.replace(info, **changes)


def image_only(**changes) -> CardInfo:
    """A NaiveMC composite whose only modality is an image."""
    info = make_info(**changes)
    return dataclasses.replace(
        info,
        method="naive",
        sources=info.sources[:1],
        modalities={"image": {**info.modalities["image"], "lora_rank": None}},
    )


def section(body: str, title: str) -> str:
    """The text of one `## title` section of the body."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", body, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r} in:\n{body}"
    return match.group(1)


def python_blocks(body: str) -> list[str]:
    return re.findall(r"^(`{3,})python\n(.*?)^\1$", body, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return render_model_card(make_info())


def test_card_parses_as_text_and_from_a_saved_file(card, tmp_path):
    reparsed = ModelCard(str(card))
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    for parsed in (reparsed, loaded):
        assert parsed.data.to_dict() == card.data.to_dict()
        assert parsed.text == card.text
    assert card.text.lstrip().startswith("# vision-audio\n")


def test_front_matter(card):
    data = card.data
    assert data.base_model == [BASE_ID, HUB_SOURCE_ID]
    assert data.base_model_relation == "merge"
    assert {"model-composition", "multimodal", "merge", "custom_code", "image", "audio"} <= set(data.tags)
    assert "video" not in data.tags and "point-cloud" not in data.tags
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "any-to-any"
    assert data.license == "apache-2.0"


def test_image_only_composite_is_image_text_to_text_with_a_pipeline_example():
    card = render_model_card(image_only())
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "audio" not in card.data.tags
    assert 'pipeline("image-text-to-text", model="org/vision-audio-composite", trust_remote_code=True)' in card.text
    assert "Routed delta rank" in card.text and "| 578 | - |" in card.text  # NaiveMC: no routed deltas
    assert "**NaiveMC**" in card.text and "**DAMC**" not in card.text
    assert "materialize_original_weights" not in card.text  # only routed (DAMC) composites have the option


def test_no_pipeline_example_without_an_image_modality():
    info = make_info()
    info = dataclasses.replace(info, sources=info.sources[1:], modalities={"speech": info.modalities["speech"]})
    card = render_model_card(info)
    assert card.data.pipeline_tag == "any-to-any"
    assert "pipeline(" not in card.text


def test_base_model_key_is_omitted_without_hub_ids():
    info = make_info()
    local_base = dataclasses.replace(info.base, reference="/models/base", hub_id=None)
    card = render_model_card(dataclasses.replace(info, base=local_base, sources=info.sources[1:]))
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()


def test_duplicate_hub_ids_are_listed_once():
    info = make_info()
    second = dataclasses.replace(info.sources[0], reference=f"{HUB_SOURCE_ID}/audio", modalities={"speech": "audio"})
    card = render_model_card(dataclasses.replace(info, sources=[info.sources[0], second]))
    assert card.data.base_model == [BASE_ID, HUB_SOURCE_ID]
    # The subfolder reference links to that folder at the pinned revision.
    assert f"https://huggingface.co/{HUB_SOURCE_ID}/tree/{HUB_REVISION}/audio" in card.text


def test_source_table_lists_every_source_with_revision_and_weight(card):
    rows = [line for line in section(card.text, "Sources").splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 2
    hub_row, local_row = rows
    assert f"`{HUB_SOURCE_ID}`" in hub_row and f"`{HUB_REVISION}`" in hub_row and hub_row.endswith("| 0.5 |")
    assert f"https://huggingface.co/{HUB_SOURCE_ID}/tree/{HUB_REVISION}" in hub_row
    assert f"`{LOCAL_SOURCE}`" in local_row and local_row.endswith("| 0.25 |") and "https://" not in local_row
    assert "`speech` (audio)" in local_row
    base = section(card.text, "Base model")
    assert f"`{BASE_ID}`" in base and "`abc123`" in base


def test_modality_table(card):
    table = section(card.text, "Modalities")
    assert "| `image` | image | `clip_vision_model` | `<image>` | 578 | 64 |" in table
    assert "| `speech` | audio | `whisper` | `<audio>` | 34 | 32 |" in table


def test_recipe_appears_verbatim(card):
    assert f"```yaml\n{RECIPE}```" in section(card.text, "Recipe")


def test_damc_usage_offers_the_dense_original_weights(card):
    usage = section(card.text, "Usage")
    dense = [block for _, block in python_blocks(usage) if "model.materialize_original_weights()" in block]
    # A block of its own that loads the model unquantized (the 4-bit block before it cannot materialize).
    assert len(dense) == 1
    assert 'from_pretrained("org/vision-audio-composite", trust_remote_code=True)\n' in dense[0]


def test_usage_snippet_loads_with_remote_code_and_uses_the_placeholders(card):
    usage = section(card.text, "Usage")
    assert 'AutoModelForCausalLM.from_pretrained("org/vision-audio-composite", trust_remote_code=True)' in usage
    assert 'AutoProcessor.from_pretrained("org/vision-audio-composite", trust_remote_code=True)' in usage
    assert 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")' in usage
    assert 'text="USER: <image> <audio> What do these have in common? ASSISTANT:"' in usage
    assert "images=[image]" in usage and "model.generate(**batch" in usage
    # A modality named other than its kind has a variable named after it, declared with its placeholder.
    assert "audio=[speech_audio]" in usage and "\n# speech_audio: a mono waveform" in usage
    blocks = python_blocks(usage)
    assert len(blocks) == 4  # full precision, 4-bit, the dense original weights (DAMC), the pipeline
    for _, code in blocks:
        ast.parse(code)


def test_the_name_stands_in_for_the_repository_when_there_is_none():
    card = render_model_card(make_info(repo_id=None))
    assert 'from_pretrained("vision-audio", trust_remote_code=True)' in card.text


def test_merge_parameters_appear_only_where_the_rule_uses_them():
    assert "Parameters:" not in section(render_model_card(make_info()).text, "Merge rule")
    ties = section(render_model_card(image_only(rule="ties", density=0.2, seed=7)).text, "Merge rule")
    assert "**ties**" in ties and "density `0.2`" in ties and "seed" not in ties
    dare = section(render_model_card(image_only(rule="dare_linear", density=0.3, seed=7)).text, "Merge rule")
    assert "**dare_linear**" in dare and "density `0.3`, seed `7`" in dare


def test_user_strings_cannot_break_the_card(tmp_path):
    name = 'my "quoted" | <b>composite</b> `x`'
    recipe = "name: 'my \"quoted\" | composite'\n# a fence inside:\n```\nnot: closed\n````\n"
    source = dataclasses.replace(make_info().sources[1], reference="./weird|path `a`")
    info = make_info(name=name, recipe_yaml=recipe, repo_id=None, sources=[make_info().sources[0], source])
    card = render_model_card(info)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == [BASE_ID, HUB_SOURCE_ID]
    title = loaded.text.lstrip().splitlines()[0]
    assert "<b>" not in title and "\\|" in title and '"quoted"' in title
    # The recipe is fenced by a longer run of backticks than any inside it, and kept verbatim.
    assert f"`````yaml\n{recipe}`````" in loaded.text
    # The source table still has five cells per row: the pipe inside the reference is escaped.
    row = next(line for line in section(loaded.text, "Sources").splitlines() if "weird" in line)
    assert len(re.split(r"(?<!\\)\|", row)) == 7
    # The name is a valid Python string in every snippet.
    for _, code in python_blocks(section(loaded.text, "Usage")):
        assert name in {node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "mixture"}, "method 'mixture'"),
        ({"rule": "slerp"}, "merge rule 'slerp'"),
        ({"modalities": {}}, "no modalities"),
    ],
)
def test_bad_info_is_a_conversion_error(changes, message):
    with pytest.raises(ConversionError, match=message):
        render_model_card(make_info(**changes))


def test_a_source_modality_the_composite_lacks_is_a_conversion_error():
    info = make_info()
    wrong = dataclasses.replace(info.sources[1], modalities={"sound": "audio"})
    with pytest.raises(ConversionError, match="'sound'"):
        render_model_card(dataclasses.replace(info, sources=[info.sources[0], wrong]))


def test_template_lookup(monkeypatch, tmp_path):
    assert template_path().name == "composite.md" and template_path().parent.name == "model_cards"
    monkeypatch.setattr(card_module, "_TEMPLATE_CANDIDATES", (tmp_path / "missing.md",))
    with pytest.raises(ConversionError, match="missing"):
        template_path()
