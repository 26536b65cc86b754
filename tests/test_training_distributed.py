"""The trainer's command line under `torchrun --nproc_per_node 2` on CPU (gloo), on the tiny world's data: both ranks
train, every step's gradient is the mean of the two ranks' own gradients, the ranks' weights stay equal, rank 0 alone
writes the output folder, and that folder is a source that composes (tests/torchrun_probe.py records each rank).

Most samples are text only and activation checkpointing is on, so that some rank's batch has no image: its projector,
modality LoRA and prefix/suffix tokens get no gradient there, which DDP must expect (it would wait forever)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.tinyworld.base import base_llm, world_tokenizer
from benchmarks.tinyworld.datasets import write_source_data
from benchmarks.tinyworld.world import make_concepts
from conversations.data import ConversationCollator, ConversationDataset, load_samples
from conversion import compose
from fixtures.tiny_composite import tiny_image_processor, tiny_vision_encoder
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor


REPOSITORY = Path(__file__).resolve().parent.parent
STEPS = 3
TIMEOUT = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny world's base LLM (untrained: a few steps need no knowledge), a tiny CLIP and 16 samples of the image
    source's data, 12 of them turned into their text-only version (the image written as its concept's name)."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = world_tokenizer()
    base_llm(tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tiny_vision_encoder().save_pretrained(root / "encoder")
    tiny_image_processor().save_pretrained(root / "encoder")
    path = write_source_data(root / "data", make_concepts(0), "image", stage=2, count=16, seed=0)
    samples = json.loads(path.read_text())
    for sample in samples[1::4] + samples[2::4] + samples[3::4]:
        sample["conversations"] = sample["text_conversations"]
        del sample["modal_inputs"]
    path.write_text(json.dumps(samples))
    return root


@pytest.fixture(scope="module")
def run(world) -> tuple[Path, Path]:
    """Stage 2 straight from the base and encoder (both LoRAs, prefix/suffix tokens and the projector train), with
    activation checkpointing, three steps of 2 samples per rank, no clipping (so that the gradients compare as they
    are)."""
    records, output = world / "records", world / "source"
    records.mkdir()
    arguments = [
        "--stage",
        "2",
        "--modality",
        "image",
        "--kind",
        "image",
        "--base_model",
        str(world / "base"),
        "--encoder",
        str(world / "encoder"),
        "--feature_layer",
        "-2",
        "--feature_select",
        "patch",
        "--prefix_tokens",
        "1",
        "--suffix_tokens",
        "1",
        "--lora_rank",
        "4",
        "--data_path",
        str(world / "data" / "image-stage2.json"),
        "--media_root",
        str(world / "data"),
        "--output_dir",
        str(output),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        "2",
        "--activation_checkpointing",
        "true",
        "--learning_rate",
        "1e-2",
        "--max_grad_norm",
        "0",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(REPOSITORY / "tests" / "torchrun_probe.py"),
                str(records),
                "--",
                *arguments,
            ],
            cwd=world,
            env=environment,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s (DDP waiting for a gradient?):\n{expired.stderr}")
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return records, output


def _load(records: Path, rank: int, kind: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(records / f"rank{rank}-{kind}-step{step}.pt", weights_only=True)


def test_both_ranks_train_in_one_gloo_group(run):
    records, _ = run
    ranks = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["backend"], r["status"]) for r in ranks] == [
        (0, 2, "gloo", 0),
        (1, 2, "gloo", 0),
    ]


def test_gradients_are_the_mean_of_the_ranks_and_weights_stay_equal(run):
    records, _ = run
    before = [_load(records, rank, "weights", 0) for rank in (0, 1)]
    assert before[0].keys() == before[1].keys() and len(before[0]) > 0
    assert all(torch.equal(before[0][name], before[1][name]) for name in before[0])
    projector = [name for name in before[0] if name.startswith("model.projectors.image.")]
    batches_without_image = 0
    for step in range(1, STEPS + 1):
        local = [_load(records, rank, "local", step) for rank in (0, 1)]
        synced = [_load(records, rank, "synced", step) for rank in (0, 1)]
        weights = [_load(records, rank, "weights", step) for rank in (0, 1)]
        # A rank whose batch has no image computes no gradient for the projector (its hooks never fired).
        batches_without_image += sum(not any(name in gradients for name in projector) for gradients in local)
        # Each rank's own micro-batch gives its own gradient (zeros where it has none) ...
        own = {
            name: [gradients.get(name, torch.zeros_like(value)) for gradients in local]
            for name, value in synced[0].items()
        }
        assert any(not torch.equal(*pair) for pair in own.values()), "the ranks read the same samples"
        for name, (first, second) in own.items():
            # ... and the optimizer steps with their mean, the same on both ranks.
            assert torch.equal(synced[0][name], synced[1][name]), name
            torch.testing.assert_close(synced[0][name], (first + second) / 2, rtol=1e-5, atol=1e-7)
        assert any(synced[0][name].abs().sum() > 0 for name in synced[0])
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
        previous = _load(records, 0, "weights", step - 1)
        assert any(not torch.equal(weights[0][name], previous[name]) for name in weights[0])
    assert 0 < batches_without_image < 2 * STEPS, "the data should give some rank a batch without an image"


def test_rank_zero_alone_writes_the_output(run):
    records, output = run
    writes = {rank: json.loads((records / f"rank{rank}.json").read_text())["writes"] for rank in (0, 1)}
    assert writes[1] == []
    written = {Path(entry.split(" ", 1)[1]).name for entry in writes[0] if entry.startswith("open ")}
    assert {"config.json", "processor_config.json", "trainer_state.json", "modeling_composite.py"} <= written
    # The folder holds the weights both ranks ended with.
    final = _load(records, 1, "weights", STEPS)
    saved = load_file(str(output / "model.safetensors"))
    assert all(torch.equal(saved[name], value) for name, value in final.items())


def test_the_output_is_a_source_that_composes(world, run):
    """A one-source DAMC composite at λ = 1 answers the source's own input exactly as the source does."""
    _, output = run
    composite_folder = compose(
        {
            "method": "damc",
            "base": str(world / "base"),
            "dtype": "float32",
            "sources": [{"path": str(output), "weight": 1.0}],
        },
        world / "composite",
        verify=False,
    )
    source = CompositeMLLMForCausalLM.from_pretrained(output).eval()
    composite = CompositeMLLMForCausalLM.from_pretrained(composite_folder).eval()
    processor = CompositeMLLMProcessor.from_pretrained(output, trust_remote_code=False)
    dataset = ConversationDataset(
        load_samples(world / "data" / "image-stage2.json"), processor, media_root=world / "data"
    )
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[4]])  # both with an image
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(composite(**batch).logits, source(**batch).logits, rtol=1e-4, atol=1e-4)
