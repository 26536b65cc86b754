"""The whole tiny world, end to end, with caching: train the base LLM -> train one decoupled (DAMC) and one shared-LoRA
(NaiveMC) source per modality with the project's trainer -> compose each method's sources with the converter (NaiveMC
and routed from the shared-LoRA sources, DAMC from the decoupled ones) -> evaluate every model on the unimodal
benchmarks, tiny MCUB-2/3/4 (multiple choice) and open tiny MCUB-2/3/4 (answered with the shared value), question by
question.

Every step writes its folder with a `.done` file holding the settings it was made with and the `.done` of what it was
made from; a later run with the same settings reuses it (and rebuilds whatever depends on a rebuilt step), so reruns
only read the evaluation back. Keys hold no paths: a moved work folder stays valid. What depends on the seed alone
(the base LLM, the encoders, the data, stage 1) may live in a `shared` folder that several runs reuse.
"""

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from conversion import compose as compose_folder
from fixtures.tiny_composite import (
    tiny_audio_encoder,
    tiny_feature_extractor,
    tiny_image_processor,
    tiny_point_encoder,
    tiny_vision_encoder,
)
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor
from training import SourceDataArguments, SourceModelArguments, SourceTrainingArguments, train_source

from .base import train_base
from .datasets import write_source_data
from .evaluate import correctness, correctness_text
from .questions import Question, mcub_open_split, mcub_split, unimodal_split
from .world import MODALITIES, make_concepts


logger = logging.getLogger("tinyworld")
KINDS = {"image": "image", "video": "video", "audio": "audio", "point": "point"}
ENCODER_SETTINGS = {
    "image": {"feature_layer": "-2", "feature_select": "patch"},
    "video": {"feature_layer": "-2", "feature_select": "patch", "num_frames": 4},
    "audio": {},
    "point": {},
}
FAMILIES = {"damc": True, "naive": False}  # family of sources -> decoupled


@dataclass(frozen=True)
class Method:
    """A composite the tiny world builds: the family of sources it composes and the recipe's `method`."""

    sources: str
    recipe_method: str


# Composite name -> method; a new method is one more entry (every table, plot and sweep follows this mapping).
# `routed`: the NaiveMC sources, each modality's tokens with their own source's LoRA and text tokens with the merge.
METHODS = {"naive": Method("naive", "naive"), "damc": Method("damc", "damc"), "routed": Method("naive", "routed")}
# The composites the `evaluation` step covers (with the base LLM and the sources): its cache key names these only,
# and every later method is evaluated in a step of its own (`evaluation-<name>`), so that adding a method leaves the
# evaluations already cached valid.
JOINTLY_EVALUATED = ("naive", "damc")
# Part of every cache key: bump it when the code that makes an artifact changes what it makes.
# 8: balanced world, questions in several wordings and random option orders (issue 23); 9: open tiny MCUB (the base
# corpus and the tokenizer's words changed).
WORLD_VERSION = 9


@dataclass
class Settings:
    """Everything a result depends on (a change retrains what it touches)."""

    seed: int = 0
    base_steps: int = 800
    base_corpus: int = 30000
    stage1_steps: int = 800
    stage1_samples: int = 4000
    stage1_learning_rate: float = 3e-3
    # One Q-Former query per input, so that an input fills one position as a concept's name does: with an MLP
    # projector (9-25 positions per input) this 4-layer LLM reads one input well but questions over 2-4 inputs fall
    # to near chance (see benchmarks/README.md). The paper's audio projector type, sized down to the LLM's width.
    projector: str = "qformer_1N_1L"
    # The Q-Former's sizes (empty for other projectors).
    projector_options: dict[str, int] = field(
        default_factory=lambda: {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256}
    )
    stage2_steps: int = 250
    stage2_samples: int = 2400
    batch_size: int = 32
    lora_rank: int = 8
    # Of the DAMC sources' text LoRA (their modality LoRA trains at 3e-3); 0 freezes it.
    text_lora_learning_rate: float = 1e-3
    # Of the NaiveMC sources' shared LoRA, the one LoRA they have (it adapts text and modality tokens alike).
    shared_lora_learning_rate: float = 3e-3
    # Stage 2 of both families: pull each source towards the base LLM reading the input's name (0: the paper's loss).
    text_distillation_weight: float = 5.0
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    mcub_questions: int = 200  # per tiny-MCUB column, multiple choice and open alike
    unimodal_questions: int = 200


STAGE1_SETTINGS = (
    "seed",
    "stage1_steps",
    "stage1_samples",
    "stage1_learning_rate",
    "projector",
    "projector_options",
    "batch_size",
    "version",
)
# What no training step depends on (changing them only evaluates again), and what only one family's sources do.
EVALUATION_SETTINGS = ("mcub_questions", "unimodal_questions")
FAMILY_ONLY_SETTINGS = {"damc": ("text_lora_learning_rate",), "naive": ("shared_lora_learning_rate",)}


def _cached(folder: Path, key: dict, build: Callable[[Path], object], label: str) -> Path:
    """Run `build(folder)` unless `folder` was built with the same `key`; a failed build leaves no `.done`."""
    marker = folder / ".done"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        logger.info("%s: cached in %s", label, folder)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    build(folder)
    marker.write_text(json.dumps(key))
    # CPU time beside wall time: on a shared machine the wall time says more about the neighbours than the work.
    logger.info("%s: %.1f s (CPU %.1f s)", label, time.perf_counter() - start, time.process_time() - cpu_start)
    return folder


def _save_encoder(modality: str, folder: Path, seed: int) -> None:
    """The frozen encoders are random (nothing can be downloaded here), seeded per modality."""
    if modality == "image":
        tiny_vision_encoder(seed=seed + 11).save_pretrained(folder)
        tiny_image_processor().save_pretrained(folder)
    elif modality == "video":
        # 16-pixel patches: 4 features per frame keep a 4-frame clip at 16 positions (motion is coarse anyway).
        torch.manual_seed(seed + 12)
        config = AutoConfig.for_model(
            "clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
        AutoModel.from_config(config).save_pretrained(folder)
        tiny_image_processor().save_pretrained(folder)
    elif modality == "audio":
        tiny_audio_encoder(seed=seed + 13).save_pretrained(folder)
        tiny_feature_extractor().save_pretrained(folder)
    else:
        tiny_point_encoder(seed=seed + 14).save_pretrained(folder)


def _training_args(folder: Path, settings: Settings, stage: int, **overrides) -> SourceTrainingArguments:
    return SourceTrainingArguments(
        output_dir=str(folder),
        stage=stage,
        max_steps=settings.stage1_steps if stage == 1 else settings.stage2_steps,
        per_device_train_batch_size=settings.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=settings.seed,
        **overrides,
    )


def _source_key(settings: Settings, family: str) -> dict:
    """What a family's stage-2 sources depend on: every training setting but the other family's rate."""
    others = {name for other, names in FAMILY_ONLY_SETTINGS.items() if other != family for name in names}
    skipped = others | set(EVALUATION_SETTINGS)
    return {
        **{name: value for name, value in asdict(settings).items() if name not in skipped},
        "version": WORLD_VERSION,
        "family": family,
    }


def build_world(work: Path, settings: Settings, shared: Path | None = None) -> dict[str, Path]:
    """Train (or reuse) the base, the encoders, the data and every source; returns name -> source folder. What depends
    on the seed alone goes under `shared` (default: `work`), so that runs that differ in stage 2 reuse it."""
    shared = work if shared is None else shared
    concepts = make_concepts(settings.seed)
    key = {**asdict(settings), "version": WORLD_VERSION}
    # Stage 1 depends on these settings only, so that a change to stage 2 (a distillation weight, a rate) reuses it.
    stage1_key = {name: key[name] for name in STAGE1_SETTINGS}
    projector_options = json.dumps(settings.projector_options) if settings.projector_options else None
    base = _cached(
        shared / "base",
        {
            "seed": settings.seed,
            "steps": settings.base_steps,
            "corpus": settings.base_corpus,
            "version": WORLD_VERSION,
        },
        lambda folder: train_base(folder, concepts, settings.seed, settings.base_steps, settings.base_corpus),
        "base LLM",
    )
    sources = {}
    for modality in MODALITIES:
        encoder = _cached(
            shared / "encoders" / modality,
            {"seed": settings.seed, "version": WORLD_VERSION},
            lambda folder, m=modality: _save_encoder(m, folder, settings.seed),
            f"{modality} encoder",
        )
        data = {}
        for stage, count in ((1, settings.stage1_samples), (2, settings.stage2_samples)):
            data[stage] = _cached(
                shared / "data" / f"{modality}-stage{stage}",
                {"seed": settings.seed, "count": count, "version": WORLD_VERSION},
                lambda folder, m=modality, s=stage, n=count: write_source_data(
                    folder, concepts, m, s, n, settings.seed
                ),
                f"{modality} stage-{stage} data",
            )
        model_args = dict(modality=modality, kind=KINDS[modality], **ENCODER_SETTINGS[modality])
        stage1 = _cached(
            shared / "sources" / f"{modality}-stage1",
            {**stage1_key, "base": (base / ".done").read_text(), "encoder": (encoder / ".done").read_text()},
            lambda folder, m=modality, d=data[1], e=encoder, a=model_args: train_source(
                SourceModelArguments(
                    base_model=str(base),
                    encoder=str(e),
                    projector=settings.projector,
                    projector_options=projector_options,
                    **a,
                ),
                SourceDataArguments(data_path=str(d / f"{m}-stage1.json"), media_root=str(d), cache_samples=True),
                _training_args(folder, settings, 1, learning_rate=settings.stage1_learning_rate),
            ),
            f"{modality} stage 1 (projector)",
        )
        for family, decoupled in FAMILIES.items():
            sources[f"{modality}-{family}"] = _cached(
                work / "sources" / f"{modality}-{family}",
                {**_source_key(settings, family), "stage1": (stage1 / ".done").read_text()},
                lambda folder, m=modality, d=data[2], a=model_args, dec=decoupled: train_source(
                    SourceModelArguments(
                        init_from=str(stage1),
                        decoupled=dec,
                        lora_rank=settings.lora_rank,
                        lora_alpha=2.0 * settings.lora_rank,
                        prefix_tokens=settings.prefix_tokens,
                        suffix_tokens=settings.suffix_tokens,
                        **a,
                    ),
                    SourceDataArguments(data_path=str(d / f"{m}-stage2.json"), media_root=str(d), cache_samples=True),
                    _training_args(
                        folder,
                        settings,
                        2,
                        projector_learning_rate=1e-3,
                        learning_rate=3e-3 if dec else settings.shared_lora_learning_rate,
                        text_lora_learning_rate=settings.text_lora_learning_rate,
                        text_distillation_weight=settings.text_distillation_weight,
                    ),
                ),
                f"{modality} stage 2 ({family})",
            )
    sources["base"] = base
    return sources


def compose(work: Path, sources: dict[str, Path], name: str, weights: dict[str, float] | None = None) -> Path:
    """Compose the four sources of method `name` (a key of `METHODS`) with the converter (linear rule; λ = 1/N unless
    given)."""
    method = METHODS[name]
    weights = weights or {modality: 1.0 / len(MODALITIES) for modality in MODALITIES}
    recipe = {
        "name": f"tinyworld-{name}",
        "method": method.recipe_method,
        "base": str(sources["base"]),
        "merge": {"rule": "linear"},
        "sources": [{"path": str(sources[f"{m}-{method.sources}"]), "weight": weights[m]} for m in MODALITIES],
        "dtype": "float32",
    }
    output = work / "composites" / name
    marker = {
        "recipe": recipe,
        "sources": {m: (sources[f"{m}-{method.sources}"] / ".done").read_text() for m in MODALITIES},
    }
    return (
        _cached(
            output.parent / f"{name}-built",
            marker,
            lambda folder: compose_folder(recipe, folder / "model", force=True, verify=False),
            f"compose {name}",
        )
        / "model"
    )


def load(folder: Path) -> tuple[CompositeMLLMForCausalLM, CompositeMLLMProcessor]:
    model = CompositeMLLMForCausalLM.from_pretrained(folder).eval()
    return model, CompositeMLLMProcessor.from_pretrained(folder, trust_remote_code=False)


# Per-question results: row label -> column -> whether each test question was answered right.
Results = dict[str, dict[str, list[bool]]]
BASE_ROW = "base LLM (inputs as names)"
# The tiny-MCUB columns, by number of inputs: multiple choice, and open (answered with the shared value).
MCUB_COLUMNS = {k: f"MCUB-{k}" for k in (2, 3, 4)}
OPEN_COLUMNS = {k: f"open-{k}" for k in (2, 3, 4)}


def evaluation_questions(settings: Settings) -> dict[str, list[Question]]:
    """The test split by column: unimodal questions per modality, tiny MCUB-2/3/4, then open tiny MCUB-2/3/4."""
    concepts = make_concepts(settings.seed)
    columns = {m: unimodal_split(concepts, m, settings.unimodal_questions, settings.seed, "test") for m in MODALITIES}
    for k, column in MCUB_COLUMNS.items():
        columns[column] = mcub_split(concepts, k, settings.mcub_questions, settings.seed, "test")
    for k, column in OPEN_COLUMNS.items():
        columns[column] = mcub_open_split(concepts, k, settings.mcub_questions, settings.seed, "test")
    return columns


def evaluate_all(sources: dict[str, Path], composites: dict[str, Path], settings: Settings) -> Results:
    """Rows: the base LLM reading every input as its concept's name (what the sources are taught to hand it), each
    single source (on its own modality), then each composite; columns: unimodal per modality, tiny MCUB-2/3/4 and open
    tiny MCUB-2/3/4."""
    by_name = {concept.name: concept for concept in make_concepts(settings.seed)}
    columns = evaluation_questions(settings)
    base = AutoModelForCausalLM.from_pretrained(sources["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(sources["base"])
    rows: Results = {
        BASE_ROW: {
            column: correctness_text(base, tokenizer, questions, by_name) for column, questions in columns.items()
        }
    }
    for family in FAMILIES:
        for modality in MODALITIES:
            model, processor = load(sources[f"{modality}-{family}"])
            rows[f"{modality} source ({family})"] = {
                modality: correctness(model, processor, columns[modality], by_name, "test")
            }
    for name, folder in composites.items():
        rows[f"{name} composite"] = evaluate_composite(folder, settings)
    return rows


def evaluate_composite(folder: Path, settings: Settings) -> dict[str, list[bool]]:
    """A composite's results on the test split, by column."""
    by_name = {concept.name: concept for concept in make_concepts(settings.seed)}
    model, processor = load(folder)
    return {
        column: correctness(model, processor, questions, by_name, "test")
        for column, questions in evaluation_questions(settings).items()
    }


def accuracies(results: Results) -> dict[str, dict[str, float]]:
    return {
        row: {column: sum(values) / len(values) for column, values in columns.items()}
        for row, columns in results.items()
    }


def run(work: Path, settings: Settings, shared: Path | None = None) -> Results:
    """Build (or reuse) the world and every composite of `METHODS`, and evaluate them (cached in
    `work/evaluation/results.json`)."""
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    sources = build_world(work, settings, shared)
    composites = {name: compose(work, sources, name) for name in METHODS}
    joint = {name: folder for name, folder in composites.items() if name in JOINTLY_EVALUATED}
    made_from = {name: (folder.parent / ".done").read_text() for name, folder in joint.items()}
    made_from.update({name: (folder / ".done").read_text() for name, folder in sources.items()})
    key = {**asdict(settings), "version": WORLD_VERSION, "made_from": made_from}
    evaluation = _cached(
        work / "evaluation",
        key,
        lambda folder: (folder / "results.json").write_text(json.dumps(evaluate_all(sources, joint, settings))),
        "evaluation",
    )
    results = json.loads((evaluation / "results.json").read_text())
    for name, folder in composites.items():
        if name in joint:
            continue
        own = _cached(
            work / f"evaluation-{name}",
            {**asdict(settings), "version": WORLD_VERSION, "made_from": (folder.parent / ".done").read_text()},
            lambda output, folder=folder: (output / "results.json").write_text(
                json.dumps(evaluate_composite(folder, settings))
            ),
            f"evaluation of {name}",
        )
        results[f"{name} composite"] = json.loads((own / "results.json").read_text())
    return results
