"""The source trainer on a tiny config: the loss falls, stages train what they should, the output loads through the
auto classes in a fresh process and composes with the converter."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fresh_python
from PIL import Image
from safetensors.torch import load_file, save_file
from warning_capture import captured_warnings

from conversations.data import IGNORE_INDEX, ConversationCollator, ConversationDataset, DataError, load_samples
from conversion import compose
from fixtures.tiny_composite import tiny_image_processor, tiny_vision_encoder
from fixtures.tiny_sources import save_tiny_base
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor
from training import SourceDataArguments, SourceModelArguments, SourceTrainingArguments, train_source
from training.__main__ import main as train_main
from training.distillation import aligned_positions, hidden_state_distillation_loss, load_text_teacher
from training.model import SourceModelError, build_source_model, load_encoder, trainable_parameter_groups


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A base LLM, a CLIP encoder with its image processor, and 16 samples: '<image> colour?' -> red | blue."""
    root = tmp_path_factory.mktemp("training")
    save_tiny_base(root / "base", seed=0)
    tiny_vision_encoder().save_pretrained(root / "encoder")
    tiny_image_processor().save_pretrained(root / "encoder")
    samples = []
    for index in range(16):
        colour = "red" if index % 2 == 0 else "blue"
        Image.fromarray(np.full((32, 32, 3), COLOURS[colour], dtype=np.uint8)).save(root / f"{index}.png")
        samples.append(
            {
                "id": f"s{index}",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": colour},
                ],
                "modal_inputs": {"vision": [f"{index}.png"]},  # the paper's key for images
                # The same conversation with the image written as text (for distillation from the base LLM).
                "text_conversations": [
                    {"from": "human", "value": f"a {colour} square\nWhat colour?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(samples))
    return root


def _model_args(world: Path, **overrides) -> SourceModelArguments:
    settings = dict(
        modality="image",
        kind="image",
        base_model=str(world / "base"),
        encoder=str(world / "encoder"),
        feature_layer="-2",
        feature_select="patch",
    )
    return SourceModelArguments(**{**settings, **overrides})


def _training_args(output: Path, stage: int, steps: int, **overrides) -> SourceTrainingArguments:
    settings = dict(
        output_dir=str(output),
        stage=stage,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return SourceTrainingArguments(**{**settings, **overrides})


@pytest.fixture(scope="module")
def stage1(world) -> Path:
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    return train_source(_model_args(world), data, _training_args(world / "stage1", 1, 12))


@pytest.fixture(scope="module")
def stage2(world, stage1) -> Path:
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(
        world, base_model=None, encoder=None, init_from=str(stage1), prefix_tokens=1, suffix_tokens=1, lora_rank=4
    )
    return train_source(
        args,
        data,
        _training_args(
            world / "stage2",
            2,
            12,
            activation_checkpointing=True,
            projector_learning_rate=1e-3,
            text_lora_learning_rate=1e-3,
        ),
    )


def _losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_labels_cover_only_the_answers(world):
    model, processor = build_source_model(_model_args(world), stage=1)
    dataset = ConversationDataset(load_samples(world / "data.json"), processor, media_root=world)
    sample = dataset[0]
    answer = [token for token, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer) == " red</s>"
    # The image placeholder is expanded into every position the model fills.
    placeholder_id = model.config.modalities["image"].placeholder_id
    assert sample["input_ids"].count(placeholder_id) == model.config.positions_per_item("image")
    assert sample["modality_inputs"]["image"].shape == (1, 3, 32, 32)


def test_stage1_trains_only_the_projector_and_the_loss_falls(world, stage1):
    losses = _losses(stage1)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    base = CompositeMLLMForCausalLM.from_pretrained(stage1)
    assert not base.config.has_routed_deltas
    model, _ = build_source_model(_model_args(world), stage=1)
    groups = trainable_parameter_groups(model, "image", stage=1)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {name for name, _ in groups["projector"]} and trainable
    assert all(name.startswith("model.projectors.image.linear_") for name in trainable)


def test_stage2_trains_both_loras_and_the_loss_falls(world, stage1, stage2):
    losses = _losses(stage2)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    model = CompositeMLLMForCausalLM.from_pretrained(stage2)
    assert model.config.text_lora == {"r": 4, "alpha": 16.0, "folded": False}
    assert model.config.modalities["image"].lora == {"r": 4, "alpha": 16.0}
    assert model.config.positions_per_item("image") == 1 + 16 + 1
    layer = model.model.routed_layers()[0]
    # Both low-rank deltas moved away from their zero start, and the stage-1 projector kept training.
    assert layer.text_lora_B.weight.abs().sum() > 0 and layer.lora_B["image"].weight.abs().sum() > 0
    first = CompositeMLLMForCausalLM.from_pretrained(stage1)
    assert not torch.equal(
        first.model.projectors["image"].linear_1.weight, model.model.projectors["image"].linear_1.weight
    )
    # The frozen parts did not move.
    assert torch.equal(
        first.model.encoders["image"].state_dict()["embeddings.patch_embedding.weight"],
        model.model.encoders["image"].state_dict()["embeddings.patch_embedding.weight"],
    )


def test_q_former_projector_trains_through_both_stages(world, tmp_path):
    """The paper's audio projector (`qformer_{Q}N_{L}L`, here sized down with projector_options) has no linears of
    its own: stage 1 trains the Q-Former, and stage 2 adds prefix/suffix tokens around its queries."""
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    projector = dict(
        projector="qformer_2N_1L",
        projector_options='{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}',
    )
    first = train_source(_model_args(world, **projector), data, _training_args(tmp_path / "s1", 1, 2))
    model, _ = build_source_model(_model_args(world, **projector), stage=1)
    trainable = {name for name, _ in trainable_parameter_groups(model, "image", stage=1)["projector"]}
    assert "model.projectors.image.qformer.query_tokens" in trainable
    assert model.model.projectors["image"].qformer.query_tokens.shape == (1, 2, 64)
    args = _model_args(
        world, base_model=None, encoder=None, init_from=str(first), prefix_tokens=1, suffix_tokens=1, lora_rank=4
    )
    second = train_source(args, data, _training_args(tmp_path / "s2", 2, 2))
    loaded = CompositeMLLMForCausalLM.from_pretrained(second)
    assert loaded.config.positions_per_item("image") == 1 + 2 + 1
    assert loaded.model.projectors["image"].prefix.shape == (1, loaded.config.get_text_config().hidden_size)


def test_training_does_not_depend_on_what_the_process_did_before(world, stage1, tmp_path):
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4, prefix_tokens=1)
    states = []
    for run in range(2):
        torch.rand(run + 1)  # a different global generator state before each run
        output = train_source(args, data, _training_args(tmp_path / f"run{run}", 2, 2))
        states.append(CompositeMLLMForCausalLM.from_pretrained(output).state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_naive_variant_has_one_shared_lora(world, stage1, tmp_path):
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), decoupled=False, lora_rank=4)
    model, _ = build_source_model(args, stage=2)
    groups = trainable_parameter_groups(model, "image", stage=2)
    assert groups["text_lora"] and not groups["modality_lora"]
    output = train_source(args, data, _training_args(tmp_path / "naive", 2, 2))
    config = CompositeMLLMForCausalLM.from_pretrained(output).config
    assert config.modalities["image"].lora is None and config.text_lora["folded"] is False


def test_stage2_output_loads_through_auto_classes_in_a_fresh_process(stage2, tmp_path):
    processor = CompositeMLLMProcessor.from_pretrained(stage2, trust_remote_code=False)
    model = CompositeMLLMForCausalLM.from_pretrained(stage2).eval()
    image = Image.fromarray(np.full((32, 32, 3), COLOURS["red"], dtype=np.uint8))
    batch = processor(text="USER: <image>\nWhat colour? ASSISTANT:", images=[image])
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({"batch": dict(batch), "logits": expected}, stage2.parent / "stage2-reference.pt")
    output = run_fresh_python(
        f"""
import torch
from transformers import AutoModelForCausalLM
reference = torch.load({str(stage2.parent / "stage2-reference.pt")!r}, weights_only=True)
model = AutoModelForCausalLM.from_pretrained({str(stage2)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**reference["batch"]).logits
torch.testing.assert_close(logits, reference["logits"])
print("ok")
""",
        hf_home=tmp_path,
    )
    assert output.strip().endswith("ok")


def _assert_damc_composite_answers_like_the_source(
    world: Path, source_folder: Path, weight: float, output: Path
) -> None:
    """A one-source DAMC composite at `weight` gives the source's logits on an image question."""
    recipe = {
        "method": "damc",
        "base": str(world / "base"),
        "sources": [{"path": str(source_folder), "weight": weight}],
        "dtype": "float32",
    }
    composite = CompositeMLLMForCausalLM.from_pretrained(compose(recipe, output, verify=False)).eval()
    source = CompositeMLLMForCausalLM.from_pretrained(source_folder).eval()
    processor = CompositeMLLMProcessor.from_pretrained(source_folder, trust_remote_code=False)
    image = Image.fromarray(np.full((32, 32, 3), COLOURS["blue"], dtype=np.uint8))
    batch = processor(text="USER: <image>\nWhat colour? ASSISTANT:", images=[image])
    with torch.no_grad():
        torch.testing.assert_close(composite(**batch).logits, source(**batch).logits, atol=1e-4, rtol=1e-4)


def test_trained_source_composes_as_a_damc_source(world, stage2, tmp_path):
    # One source at weight 1: the composite (text delta folded in) equals the trained source (unfolded).
    _assert_damc_composite_answers_like_the_source(world, stage2, 1.0, tmp_path / "composite")


def test_bad_inputs_give_clear_errors(world, stage1, tmp_path):
    with pytest.raises(SourceModelError, match="--base_model and --encoder"):
        build_source_model(SourceModelArguments(modality="image", kind="image"), stage=1)
    with pytest.raises(SourceModelError, match="not 'sound' of kind 'audio'"):
        build_source_model(SourceModelArguments(modality="sound", kind="audio", init_from=str(stage1)), stage=2)
    with pytest.raises(SourceModelError, match="--projector_options must be a JSON object"):
        build_source_model(_model_args(world, projector="qformer_1N_1L", projector_options="hidden_size=64"), stage=1)
    with pytest.raises(ValueError, match="projector_options must be a dict with keys among"):
        build_source_model(_model_args(world, projector="qformer_1N_1L", projector_options='{"width": 64}'), stage=1)
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "conversations": [{"from": "human", "value": "<image> hi"}],
                    "modal_inputs": {"image": ["missing.png"]},
                }
            ]
        )
    )
    model, processor = build_source_model(_model_args(world), stage=1)
    with pytest.raises(DataError, match="Sample x: no assistant"):
        ConversationDataset(load_samples(bad), processor, media_root=world)[0]
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "y",
                    "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "ok"}],
                    "modal_inputs": {"image": ["missing.png"]},
                }
            ]
        )
    )
    with pytest.raises(DataError, match="Sample y: .*missing.png: no such file"):
        ConversationDataset(load_samples(bad), processor, media_root=world)[0]


def test_command_line_reports_bad_arguments_in_one_line(world, capsys):
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            "--data_path",
            str(world / "data.json"),
            "--output_dir",
            str(world / "cli"),
            "--stage",
            "1",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: Without --init_from, both --base_model and --encoder")
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            "--data_path",
            str(world / "data.json"),
            "--output_dir",
            str(world / "cli"),
            "--text_lora_learning_rate",
            "-1",
            "--use_cpu",
            "true",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --text_lora_learning_rate must be >= 0 (0 freezes that group), got -1.0."
    )


def test_weight_search_picks_and_records_lambda(world, stage2, tmp_path):
    """Agreement with the source: with one source, λ = 1 reproduces it exactly, so it scores 1.0; the composite is
    written with the winner, which the config records with every score."""
    recipe = {
        "name": "searched",
        "method": "damc",
        "base": str(world / "base"),
        "sources": [{"path": str(stage2)}],
        "weight_search": {
            "grid": [0.0, 1.0],
            "objective": "agreement",
            "data": str(world / "data.json"),
            "media_root": str(world),
            "max_samples": 6,
        },
        "dtype": "float32",
    }
    with captured_warnings() as found:
        output = compose(recipe, tmp_path / "searched", verify=False)
    assert found == []  # reading the trained source and every candidate's processor warns about nothing
    composition = json.loads((output / "config.json").read_text())["composition"]
    search = composition["weight_search"]
    assert search["scores"]["1.0"] == 1.0
    assert search["grid"] == [0.0, 1.0]
    assert search["chosen"] == max(search["grid"], key=lambda value: search["scores"][str(value)])
    assert [source["weight"] for source in composition["sources"]] == [search["chosen"]]
    # The written composite is the plain composition at the chosen λ.
    plain = compose(
        {
            **{k: v for k, v in recipe.items() if k != "weight_search"},
            "sources": [{"path": str(stage2), "weight": search["chosen"]}],
        },
        tmp_path / "plain",
        verify=False,
    )
    searched_state = CompositeMLLMForCausalLM.from_pretrained(output).state_dict()
    plain_state = CompositeMLLMForCausalLM.from_pretrained(plain).state_dict()
    assert searched_state.keys() == plain_state.keys()
    assert all(torch.equal(searched_state[key], plain_state[key]) for key in plain_state)


def test_weight_search_accuracy_scores_against_the_given_answers(world, stage2, tmp_path):
    from conversion.recipe import load_recipe
    from conversion.weight_search import answer_questions, search_weights

    recipe = load_recipe(
        {
            "method": "naive",
            "base": str(world / "base"),
            "sources": [{"path": str(stage2)}],
            "weight_search": {
                "grid": [0.5, 1.0],
                "objective": "accuracy",
                "data": str(world / "data.json"),
                "media_root": str(world),
                "max_samples": 6,
            },
        }
    )
    folders = {}

    def compose_candidate(candidate, folder):
        folders[candidate.sources[0].weight] = compose(candidate, folder, verify=False)
        answers = answer_questions(
            folders[candidate.sources[0].weight], load_samples(world / "data.json")[:6], str(world)
        )
        expected_scores[candidate.sources[0].weight] = (
            sum(answers[i] == ("red" if i % 2 == 0 else "blue") for i in range(6)) / 6
        )
        return folders[candidate.sources[0].weight]

    expected_scores: dict[float, float] = {}
    chosen, scores = search_weights(recipe, compose_candidate, tmp_path / "search")
    assert scores == expected_scores and set(scores) == {0.5, 1.0}
    assert scores[chosen] == max(scores.values())


def test_every_lambda_search_visits_the_grid_in_order_and_picks_the_first_best_per_criterion(tmp_path, caplog):
    """The loop both λ searches (the converter's and the tiny world's) run: candidates composed and scored in grid
    order (not sorted), every criterion picked on its own, a tie going to the earlier candidate, each score logged."""
    from conversion.weight_search import search_grid

    rows = {0.5: (0.2, 0.9), 0.0: (0.7, 0.1), 1.0: (0.7, 0.9), 0.25: (0.1, 0.3)}  # (validation, agreement)
    visited = []

    def compose_at(value):
        visited.append(("compose", value))
        return tmp_path / f"lambda-{value}"

    def scores(folder):
        value = float(folder.name.removeprefix("lambda-"))
        visited.append(("score", value))
        return {"validation": rows[value][0], "agreement": rows[value][1]}

    with caplog.at_level(logging.INFO, logger="conversion.weight_search"):
        table, picks = search_grid(list(rows), compose_at, scores, label="test")
    assert visited == [(step, value) for value in rows for step in ("compose", "score")]
    assert list(table) == list(rows)
    assert table == {value: {"validation": v, "agreement": a} for value, (v, a) in rows.items()}
    assert picks == {"validation": 0.0, "agreement": 0.5}  # both tie with λ = 1.0, which comes later
    assert "test: λ = 0.25 scores 0.100 (validation), 0.300 (agreement)" in caplog.text


def test_weight_search_recipe_errors(world, stage2):
    from conversion.errors import ConversionError
    from conversion.recipe import load_recipe

    base = {"method": "naive", "base": str(world / "base")}
    search = {"grid": [0.5], "data": str(world / "data.json")}
    with pytest.raises(ConversionError, match="remove the sources' `weight` keys"):
        load_recipe({**base, "sources": [{"path": str(stage2), "weight": 1.0}], "weight_search": search})
    with pytest.raises(ConversionError, match="weight_search.grid must be a non-empty list"):
        load_recipe({**base, "sources": [{"path": str(stage2)}], "weight_search": {**search, "grid": []}})
    with pytest.raises(ConversionError, match="weight_search.objective 'loss' is unknown"):
        load_recipe({**base, "sources": [{"path": str(stage2)}], "weight_search": {**search, "objective": "loss"}})


def test_zero_text_lora_learning_rate_freezes_the_text_lora(world, stage1, tmp_path):
    """0 is a rate, not "unset": the text LoRA stays at its zero start while the modality LoRA trains."""
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4)
    output = train_source(args, data, _training_args(tmp_path / "frozen-text", 2, 3, text_lora_learning_rate=0.0))
    layer = CompositeMLLMForCausalLM.from_pretrained(output).model.routed_layers()[0]
    assert layer.text_lora_B.weight.abs().sum() == 0 and layer.lora_B["image"].weight.abs().sum() > 0
    # So whatever λ its text delta gets, a DAMC composite answers this modality's inputs exactly as the source does.
    _assert_damc_composite_answers_like_the_source(world, output, 0.25, tmp_path / "composite")


def test_negative_group_learning_rate_is_refused(world, stage1, tmp_path):
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4)
    with pytest.raises(ValueError, match="--projector_learning_rate must be >= 0"):
        train_source(args, data, _training_args(tmp_path / "negative", 2, 1, projector_learning_rate=-1e-3))


def test_text_version_aligns_the_input_end_and_every_token_after_it(world):
    model, processor = build_source_model(_model_args(world), stage=1)
    samples = load_samples(world / "data.json")
    dataset = ConversationDataset(samples, processor, media_root=world, with_text_version=True)
    item = dataset[1]
    placeholder_id = model.config.modalities["image"].placeholder_id
    last_input = max(position for position, token in enumerate(item["input_ids"]) if token == placeholder_id)
    version = item["text_version"]
    # The input's last position (its last feature) stands against the last token of its text ("a blue square"); every
    # token after it is the same in both versions.
    assert version["aligned"] == len(item["input_ids"]) - last_input
    assert version["input_ids"][1 - version["aligned"] :] == item["input_ids"][last_input + 1 :]
    text = processor.tokenizer.decode(version["input_ids"])
    assert text.endswith("USER: a blue square\nWhat colour? ASSISTANT: blue</s>")
    input_end = len(version["input_ids"]) - version["aligned"] + 1
    assert processor.tokenizer.decode(version["input_ids"][:input_end]).endswith("a blue square")
    first = dataset[0]
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([first, item])
    ends = batch["text_version"]["attention_mask"].sum(-1)
    rows, positions = aligned_positions(ends, batch["text_version"]["aligned"])
    count = first["text_version"]["aligned"]
    assert rows.tolist() == [0] * count + [1] * version["aligned"]
    # Each row's aligned positions run up to its last real token, not into the padding.
    assert positions[:count].tolist() == list(range(ends[0] - count, ends[0]))
    assert positions[count:].tolist() == list(range(ends[1] - version["aligned"], ends[1]))


def test_text_version_errors_name_the_sample(world, tmp_path):
    _, processor = build_source_model(_model_args(world), stage=1)
    sample = json.loads((world / "data.json").read_text())[0]
    cases = [
        ({k: v for k, v in sample.items() if k != "text_conversations"}, "no `text_conversations` list"),
        (
            {
                **sample,
                "text_conversations": [
                    {"from": "human", "value": "a red square\nWhich colour?"},
                    {"from": "gpt", "value": "red"},
                ],
            },
            "text after its last input differs",
        ),
        ({**sample, "text_conversations": sample["conversations"]}, "still has a modality placeholder"),
    ]
    for bad, message in cases:
        dataset = ConversationDataset([bad], processor, media_root=world, with_text_version=True)
        with pytest.raises(DataError, match=f"Sample s0: .*{message}"):
            dataset[0]


def test_distillation_loss_compares_only_the_aligned_positions():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 6, 4) for _ in range(3))
    teacher_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    aligned = torch.tensor([2, 3])
    # The student is longer (its input spans more positions) and differs everywhere except the aligned tail.
    student = tuple(torch.randn(2, 8, 4) for _ in range(3))
    student_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    for layer_s, layer_t in zip(student, teacher):
        layer_s[0, 3:5], layer_s[1, 5:8] = layer_t[0, 2:4], layer_t[1, 3:6]
    assert hidden_state_distillation_loss(student, student_mask, teacher, teacher_mask, aligned) == 0
    student[2][1, 7] += 1.0
    assert hidden_state_distillation_loss(student, student_mask, teacher, teacher_mask, aligned) > 0
    with pytest.raises(ValueError, match="must be the base LLM the source was built from"):
        hidden_state_distillation_loss(student[:2], student_mask, teacher, teacher_mask, aligned)


def _distillation_gap(world: Path, source: Path) -> float:
    """The distillation loss of a trained source over the data: how far it is from the base reading the text."""
    model = CompositeMLLMForCausalLM.from_pretrained(source).eval()
    processor = CompositeMLLMProcessor.from_pretrained(source, trust_remote_code=False)
    samples = load_samples(world / "data.json")
    dataset = ConversationDataset(samples, processor, media_root=world, with_text_version=True)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([dataset[index] for index in range(len(dataset))])
    version = batch.pop("text_version")
    teacher = load_text_teacher(str(world / "base"), "cpu")
    with torch.no_grad():
        student = model(**batch, output_hidden_states=True).hidden_states
        reference = teacher(
            input_ids=version["input_ids"], attention_mask=version["attention_mask"], output_hidden_states=True
        ).hidden_states
    return hidden_state_distillation_loss(
        student, batch["attention_mask"], reference, version["attention_mask"], version["aligned"]
    ).item()


def test_text_distillation_pulls_the_source_towards_the_base_reading_text(world, stage1, tmp_path):
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4, prefix_tokens=1)
    gaps = {}
    for weight in (0.0, 5.0):
        # The teacher defaults to the base recorded in the source's composition (the stage-1 --base_model).
        output = train_source(
            args, data, _training_args(tmp_path / f"weight-{weight}", 2, 8, text_distillation_weight=weight)
        )
        gaps[weight] = _distillation_gap(world, output)
    assert gaps[5.0] < 0.25 * gaps[0.0]
    with pytest.raises(ValueError, match="--text_distillation_weight must be >= 0"):
        train_source(args, data, _training_args(tmp_path / "negative", 2, 1, text_distillation_weight=-1.0))


def test_cached_samples_are_built_once_and_equal_the_uncached(world):
    _, processor = build_source_model(_model_args(world), stage=1)
    samples = load_samples(world / "data.json")
    cached = ConversationDataset(samples, processor, media_root=world, cache_samples=True, with_text_version=True)
    plain = ConversationDataset(samples, processor, media_root=world, with_text_version=True)
    first = cached[3]
    assert cached[3] is first and plain[3] is not plain[3]
    assert first["input_ids"] == plain[3]["input_ids"] and first["text_version"] == plain[3]["text_version"]
    assert torch.equal(first["modality_inputs"]["image"], plain[3]["modality_inputs"]["image"])


def test_text_distillation_with_gradient_accumulation_matches_one_big_batch(world, stage1, tmp_path):
    """Plain SGD without clipping, one step over the same 8 samples: 2 micro-batches of 4 must move the weights as
    one batch of 8 (up to the per-micro-batch normalisation of the distillation term), not count it twice."""
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4)
    moved = {}
    for accumulation in (1, 2):
        training = _training_args(
            tmp_path / f"accumulate-{accumulation}",
            2,
            1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            text_distillation_weight=5.0,
            gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=8 // accumulation,
        )
        output = train_source(args, data, training)
        layer = CompositeMLLMForCausalLM.from_pretrained(output).model.routed_layers()[0]
        moved[accumulation] = layer.lora_B["image"].weight
    assert moved[1].abs().sum() > 0
    assert (moved[2] - moved[1]).norm() < 0.05 * moved[1].norm()


# --------------------------------------------------------------------------------------------------------------------
# What a new user meets: a full CLIP checkpoint as encoder, warnings, wrong encoders, paths, a CPU


def test_a_full_clip_checkpoint_gives_its_vision_tower_silently(tiny_sources, tmp_path):
    """The two-tower checkpoint the paper names: its vision tower, weight for weight, with no load report about the
    text tower, also when the checkpoint holds the position ids older transformers saved."""
    clip = shutil.copytree(tiny_sources["clip"], tmp_path / "clip")
    weights = load_file(str(clip / "model.safetensors"))
    weights["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(weights, str(clip / "model.safetensors"), metadata={"format": "pt"})
    with captured_warnings() as found:
        encoder = load_encoder(str(clip))
    assert found == []
    assert type(encoder).__name__ == "CLIPVisionModel"
    state = encoder.state_dict()
    expected = {
        key.removeprefix("vision_model."): tensor
        for key, tensor in weights.items()
        if key.startswith("vision_model.") and not key.endswith("position_ids")
    }
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], tensor) for key, tensor in expected.items())


def test_a_correct_training_run_prints_no_warning(world, tiny_sources, tmp_path):
    """Stage 1 from a full CLIP checkpoint, stage 2 with activation checkpointing, on this machine's CPU."""
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    training = {"use_cpu": False, "disable_tqdm": True}
    with captured_warnings() as found:
        stage1 = train_source(
            _model_args(world, encoder=str(tiny_sources["clip"])),
            data,
            _training_args(tmp_path / "one", 1, 2, **training),
        )
        args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4, prefix_tokens=1)
        train_source(args, data, _training_args(tmp_path / "two", 2, 2, activation_checkpointing=True, **training))
    assert found == []


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (
            "llava",
            "is a whole multimodal model (llava: a language model with its own encoder and projector whose "
            "encoder is a clip_vision_model), where an encoder belongs; pass the encoder checkpoint it was "
            "built on instead (a CLIP or SigLIP checkpoint",
        ),
        ("video_llava", "is a whole multimodal model (video_llava"),
        (
            "qwen2_audio",
            "is a whole multimodal model (qwen2_audio: a language model with its own encoder and "
            "projector whose encoder is a qwen2_audio_encoder)",
        ),
        ("base", "is a language model (llama), where an encoder belongs; it is the base LLM"),
    ],
)
def test_an_encoder_that_is_not_one_is_named_with_the_fix(wrong, message, world, tiny_sources, capsys):
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            "--base_model",
            str(world / "base"),
            "--encoder",
            str(tiny_sources[wrong]),
            "--data_path",
            str(world / "data.json"),
            "--output_dir",
            str(world / "wrong"),
            "--stage",
            "1",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --encoder {tiny_sources[wrong]} {message}")


def test_a_composite_as_encoder_is_named_as_a_whole_model(saved_composite):
    with pytest.raises(SourceModelError, match="is a whole multimodal model \\(composite_mllm"):
        load_encoder(str(saved_composite))


@pytest.mark.parametrize("argument", ["--base_model", "--init_from"])
def test_a_base_or_start_that_cannot_be_loaded_is_one_line(argument, world, tmp_path, capsys):
    location = str(tmp_path / "no-such-model")
    start = (
        ["--base_model", location, "--encoder", str(world / "encoder"), "--stage", "1"]
        if argument == "--base_model"
        else ["--init_from", location, "--stage", "2"]
    )
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            *start,
            "--data_path",
            str(world / "data.json"),
            "--output_dir",
            str(tmp_path / "out"),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {argument} {location}: cannot be loaded (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine --bf16 true is valid")
def test_bf16_without_a_gpu_says_what_to_change(world, capsys):
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            "--base_model",
            str(world / "base"),
            "--encoder",
            str(world / "encoder"),
            "--data_path",
            str(world / "data.json"),
            "--output_dir",
            str(world / "bf16"),
            "--stage",
            "1",
            "--bf16",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --bf16 true needs a GPU with bf16 support, and this machine has none. On a CPU, drop --bf16 true "
        "(training runs in float32), or add --use_cpu true to keep bf16 autocast on the CPU."
    )
    # The CPU variant the message names is accepted.
    assert SourceTrainingArguments(output_dir=str(world / "bf16"), bf16=True, use_cpu=True, report_to=[]).bf16


def test_sources_record_their_base_absolutely_so_distillation_works_from_anywhere(world, tmp_path, monkeypatch):
    """Stage 1 run with relative paths; stage 2 distils from another directory, from the base the source recorded."""
    data = SourceDataArguments(data_path=str(world / "data.json"), media_root=str(world))
    monkeypatch.chdir(world)
    stage1 = train_source(
        _model_args(world, base_model="base", encoder="encoder"), data, _training_args(tmp_path / "one", 1, 1)
    )
    recorded = json.loads((stage1 / "config.json").read_text())["composition"]
    assert recorded["base"] == str(world / "base") and recorded["encoder"] == str(world / "encoder")
    monkeypatch.chdir(tmp_path)
    args = _model_args(world, base_model=None, encoder=None, init_from=str(stage1), lora_rank=4)
    output = train_source(args, data, _training_args(tmp_path / "two", 2, 1, text_distillation_weight=1.0))
    assert json.loads((output / "config.json").read_text())["composition"]["base"] == str(world / "base")


@pytest.mark.parametrize("recorded", ["relative/base", "/moved/away/base", "some-org/no-such-base"])
def test_an_unreachable_recorded_base_is_a_clear_error(recorded, world, stage1, tmp_path, capsys):
    source = shutil.copytree(stage1, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    config["composition"]["base"] = recorded
    (source / "config.json").write_text(json.dumps(config))
    code = train_main(
        [
            "--modality",
            "image",
            "--kind",
            "image",
            "--init_from",
            str(source),
            "--stage",
            "2",
            "--lora_rank",
            "4",
            "--data_path",
            str(world / "data.json"),
            "--media_root",
            str(world),
            "--output_dir",
            str(tmp_path / "out"),
            "--text_distillation_weight",
            "1",
            "--max_steps",
            "1",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar of loading the source
    assert last.startswith(
        f"error: The text teacher {recorded!r} (the base LLM recorded in the source's config "
        "(composition.base)) cannot be loaded: "
    )
    assert last.endswith("Pass --text_distillation_teacher with the base LLM's folder or Hub id.")


def test_the_whole_dataset_is_checked_before_the_first_step_and_every_bad_sample_reported(world, tmp_path):
    """One run reports every unusable sample by id, and nothing is trained or written (no output folder)."""
    good = json.loads((world / "data.json").read_text())[:2]
    png = (world / "0.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.png").write_text("not an image")
    np.save(tmp_path / "frames.npy", np.zeros((2, 8, 8, 3), np.uint8))  # a video where an image belongs
    ok = str(world / "0.png")

    def sample(sample_id, question="<image>\nWhat colour?", answer="red", inputs=(ok,), key="image"):
        turns = [{"from": "human", "value": question}] + ([{"from": "gpt", "value": answer}] if answer else [])
        return {"id": sample_id, "conversations": turns, "modal_inputs": {key: list(inputs)} if inputs else {}}

    bad = {
        "no-answer": (sample("no-answer", answer=None), "no assistant (`gpt`) turn"),
        "odd-turn": (
            {**sample("odd-turn"), "conversations": [{"from": "robot", "value": "x"}]},
            "every turn needs `from`",
        ),
        "missing": (sample("missing", inputs=["nowhere.png"]), "nowhere.png: no such file"),
        "empty": (sample("empty", inputs=[str(tmp_path / "empty.png")]), "empty.png: the file is empty"),
        "truncated": (
            sample("truncated", inputs=[str(tmp_path / "truncated.png")]),
            "truncated.png: not a readable image file",
        ),
        "not-an-image": (
            sample("not-an-image", inputs=[str(tmp_path / "text.png")]),
            "text.png: not a readable image file",
        ),
        "video-as-image": (sample("video-as-image", inputs=[str(tmp_path / "frames.npy")]), "with (2, 3) dimensions"),
        "two-placeholders": (
            sample("two-placeholders", question="<image> <image> Same?"),
            "has 2 <image> placeholder(s) but 1 image input(s)",
        ),
        "no-placeholder": (
            sample("no-placeholder", question="What colour?"),
            "has 0 <image> placeholder(s) but 1 image",
        ),
        "no-input": (sample("no-input", inputs=()), "has 1 <image> placeholder(s) but 0 image input(s)"),
        "other-modality": (sample("other-modality", key="audio"), "modal_inputs key 'audio' names no modality"),
    }
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good[0], *(case for case, _ in bad.values()), good[1]]))
    output = tmp_path / "out"
    arguments = SourceDataArguments(data_path=str(data), media_root=str(world))
    with pytest.raises(DataError) as caught:
        train_source(_model_args(world), arguments, _training_args(output, 1, 2))
    lines = str(caught.value).splitlines()
    assert lines[0] == (
        f"{len(bad)} of {len(bad) + 2} training samples cannot be used (nothing was trained); fix or remove them:"
    )
    reported = {line.strip().split(": ", 1)[0] for line in lines[1:]}
    assert reported == set(bad)
    for sample_id, (_, message) in bad.items():
        assert any(line.strip().startswith(f"{sample_id}: ") and message in line for line in lines[1:]), sample_id
    assert not output.exists()
