"""`compose(recipe, output_dir)`: read and check every source, then stream the composite into a temporary folder,
verify it in a fresh process, and move it into place."""

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import jinja2
import torch
import transformers
from tqdm.auto import tqdm
from transformers import GenerationConfig, WhisperFeatureExtractor

import modeling_composite
from composition.chat_template import CHAT_TEMPLATE_NAMES, named_chat_template
from composition.compose import placeholder_suppression
from composition.image_processor import CLIP_IMAGE_SETTINGS, clip_image_processor
from composition.saving import composite_auto_map, register_processor_auto_classes
from modeling_composite.compat import TOOLS_MINIMUM_TRANSFORMERS, check_transformers_version
from modeling_composite.modeling_composite import CompositeMLLMForCausalLM
from modeling_composite.processing_composite import CompositeMLLMProcessor

from .card import CardInfo, CardSource, render_model_card
from .detect import read_source
from .errors import ConversionError
from .locate import Location, locate, recording_inputs
from .merge import MERGE_RULES
from .output import OutputRun, check_replaceable, hold_for_test, output_path, refuse_overlap
from .paper_cards import paper_notes
from .plan import Plan, build_plan, check_compatibility
from .provenance import forget_local_paths, public_recipe_text, public_reference
from .recipe import Recipe, load_recipe
from .sources import BaseModel, Source
from .tensors import TensorRead, non_finite_count, recording_reads
from .verify import verify_composite
from .writer import ShardedWriter, parse_size


# Conversion uses transformers APIs newer than the remote code's floor (README: Supported versions).
check_transformers_version(transformers.__version__, TOOLS_MINIMUM_TRANSFORMERS, needed_by="Conversion")

logger = logging.getLogger(__name__)

# The remote code that travels inside every composite folder: every module of the `modeling_composite` folder (its
# `__init__.py` is the installed package's entry, not a module of a composite).
REMOTE_CODE_FILES = tuple(
    sorted(path.name for path in Path(modeling_composite.__file__).parent.glob("*.py") if path.name != "__init__.py")
)
RECIPE_FILE = "composite_recipe.yaml"


def compose(
    recipe: "str | Path | dict | Recipe",
    output_dir: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    max_shard_size: str | int = "2GB",
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> Path:
    """Build the composite a recipe describes into `output_dir`; returns its path.

    Args:
        recipe: a YAML file (its relative paths start from its folder), a dict, or a parsed `Recipe` (relative paths
            start from the current directory).
        output_dir: the folder to create. It appears only once complete (written beside it, then renamed), and may
            not overlap the inputs or contain the current directory (see `output.py`).
        force: replace an existing `output_dir` that is a composite (never another folder).
        verify: load the result in a fresh process through the auto classes and run one forward before finishing.
        max_shard_size: the largest weight shard, e.g. "2GB"; it also bounds the memory the writing needs.
        push_to_hub: a Hub repo id to upload the finished folder to (with its model card). The token, the repo id
            and the network are checked before any source is read; when the upload itself fails, the folder is kept
            and the error gives the command that uploads it.
        private: create the Hub repo as private.
        token: Hub token for the upload (default: the logged-in one).
    """
    recipe = load_recipe(recipe)
    shard_bytes = parse_size(max_shard_size)
    output = output_path(output_dir)
    # Held for the whole run: one run per output; it also cleans up what an earlier, killed run of it left.
    with OutputRun(output) as run:
        check_replaceable(output, force)  # before any source is read; checked again before the output is replaced
        if push_to_hub:
            from .hub import check_push_access

            check_push_access(push_to_hub, token=token)
        with recording_inputs() as inputs:
            base = BaseModel(locate(recipe.base, "base"))
            sources = [read_source(source, locate(source.path, source.label)) for source in recipe.sources]
        refuse_overlap(output, inputs)
        _log_sources(base, sources, recipe)
        check_compatibility(base, sources, recipe)
        search_result = None
        if recipe.weight_search is not None:  # the λ it picks reaches the plan through `recipe.weights()`
            recipe, search_result = _search_weights(recipe, run, max_shard_size)
        composition = _composition(recipe, base.location, sources)
        if search_result is not None:
            composition["weight_search"] = search_result
        plan = build_plan(base, sources, recipe, composition)
        forget_local_paths(plan.config, public_reference(base.location.reference, base.location.hub_id))
        _log_weights(recipe)
        processor = _processor(plan, recipe)  # before writing: it checks that the sources' processors can be combined
        check_chat_template(processor)
        logger.info(
            "composite: %d modalities (%s), %d tensors",
            len(plan.modalities),
            ", ".join(plan.modalities),
            len(plan.producers),
        )
        with run.staged(force) as folder:
            _write_weights(plan, folder, shard_bytes)
            _record_routing(plan)
            _write_metadata(plan, processor, folder, base, recipe, push_to_hub, output)
            hold_for_test("written")
            if verify:
                report = verify_composite(folder, scratch=run.new_folder("verify"))
                logger.info(
                    "verified: a fresh process loaded %s through the auto classes (no missing or unexpected weights) "
                    "and ran one forward over %d positions with every modality; logits are finite",
                    report["class"],
                    report["sequence"],
                )
        if push_to_hub:
            _push(output, push_to_hub, private, token)
    return Path(output_dir)


def _search_weights(recipe: Recipe, run: OutputRun, max_shard_size: str | int) -> tuple[Recipe, dict]:
    """Choose λ by `recipe.weight_search`, composing the candidates in scratch space beside the output."""
    from .weight_search import search_weights

    scratch = run.new_folder("search")
    try:
        chosen, scores = search_weights(
            recipe,
            lambda candidate, folder: compose(candidate, folder, verify=False, max_shard_size=max_shard_size),
            scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    search = recipe.weight_search
    logger.info(
        "weight search: λ = %g for every source (%s: %s)",
        chosen,
        search.objective,
        ", ".join(f"{value:g} -> {score:.3f}" for value, score in scores.items()),
    )
    result = {
        "objective": search.objective,
        "data": public_reference(search.data),
        "grid": search.grid,
        "scores": {str(value): score for value, score in scores.items()},
        "chosen": chosen,
    }
    sources = [dataclasses.replace(source, weight=chosen) for source in recipe.sources]
    return dataclasses.replace(recipe, sources=sources), result


def _log_weights(recipe: Recipe) -> None:
    """Say what λ each source gets when the recipe leaves it to the default."""
    if recipe.weight_search is None and all(source.weight is None for source in recipe.sources):
        count = len(recipe.sources)
        logger.info(
            "λ = 1/N = %g for %s (the paper's default; set `weight:` on every source to choose)",
            1 / count,
            "the one source" if count == 1 else f"each of the {count} sources",
        )


def _log_sources(base: BaseModel, sources: list[Source], recipe: Recipe) -> None:
    """With -v: what each source was read as."""
    logger.debug(
        "base: %s (%s, %d layers, vocabulary %d)",
        base.location.folder,
        base.config.model_type,
        base.config.num_hidden_layers,
        base.vocab,
    )
    for source, weight in zip(sources, recipe.weights()):
        text_delta = "full weights" if source.full_weights is not None else "low-rank"
        ranks = sorted({low_rank.rank for low_rank in source.text_lora.values()})
        logger.debug(
            "%s: format %s at %s; text delta: %s%s, λ %g; %s",
            source.label,
            source.format,
            source.location.folder,
            text_delta,
            f" (rank {ranks})" if ranks else "",
            weight,
            "decoupled modality parameters" if source.decoupled else "no modality parameters of its own",
        )
        for name, part in source.modalities.items():
            logger.debug(
                "%s:   modality %s (%s): encoder %s, feature layer %s (%s), projector %s%s",
                source.label,
                name,
                part.kind,
                part.encoder_config.model_type,
                part.feature_layer,
                part.feature_select,
                part.projector,
                f", modality LoRA rank {part.lora['r']}" if part.lora else "",
            )


def _push(folder: Path, repo_id: str, private: bool, token: str | None) -> None:
    """Upload the finished folder; if that fails, the folder stays and the error says how to upload it later."""
    from .hub import push_folder, upload_command

    try:
        url = push_folder(folder, repo_id, private=private, token=token)
    except ConversionError as error:
        raise ConversionError(
            f"{error}. The composite is kept in {folder}; upload it with: {upload_command(folder, repo_id, private)}"
        ) from None
    logger.info("pushed to %s", url)


def _composition(recipe: Recipe, base: Location, sources: list[Source]) -> dict:
    """Provenance recorded in the config: enough to tell exactly what went in."""
    return {
        "method": recipe.method,
        "rule": recipe.merge.rule,
        "density": recipe.merge.density,
        "seed": recipe.merge.seed if MERGE_RULES[recipe.merge.rule].sparsify == "drop" else None,
        **recipe.merge.provenance(),
        "base": {
            "reference": public_reference(base.reference, base.hub_id),
            "hub_id": base.hub_id,
            "revision": base.revision,
        },
        "sources": [
            {
                "reference": public_reference(source.location.reference, source.location.hub_id),
                "hub_id": source.location.hub_id,
                "revision": source.location.revision,
                "format": source.format,
                "weight": weight,
                "modalities": {name: part.kind for name, part in source.modalities.items()},
            }
            for source, weight in zip(sources, recipe.weights())
        ],
    }


def _record_routing(plan: Plan) -> None:
    """Method routed: each source's rank and the share of its delta's energy that its factors keep (known once every
    factor was written), into the config's composition, which the card reads."""
    if plan.routed is None:
        return
    routing = plan.routed.provenance()
    composition = plan.config.composition
    for entry, routed in zip(composition["sources"], routing["sources"]):
        entry.update(routed)
    composition["routing"] = {"text": routing["text"], "modalities": routing["modalities"]}
    for source, entry in zip(plan.routed.sources, composition["sources"]):
        if entry["energy_kept"] is not None and entry["energy_kept"] < 1.0:
            logger.info(
                "%s: its rank-%d factors keep %.1f%% of its delta's energy (squared Frobenius norm)",
                source.label,
                entry["rank"],
                100 * entry["energy_kept"],
            )
    text = routing["text"]
    if text["energy_kept"] is not None and text["energy_kept"] < 1.0:
        logger.info(
            "the text block (rank %d) keeps %.1f%% of the merged delta's energy",
            text["rank"],
            100 * text["energy_kept"],
        )


def _write_weights(plan: Plan, folder: Path, shard_bytes: int) -> None:
    floating = floating_keys(plan.config)
    writer = ShardedWriter(folder, shard_bytes, plan.shapes)
    # A context manager, so that the progress bar is gone before an error line is printed.
    with tqdm(total=len(plan.producers), desc="writing tensors", unit="tensor", leave=False) as progress:
        try:
            for key, produce in plan.producers.items():
                with recording_reads() as reads:
                    tensor = produce()
                writer.add(key, checked_output_tensor(key, tensor, reads, key in floating, plan.dtype))
                progress.update()
            files = writer.close()
        except OSError as error:
            raise _write_failed(error) from error
    logger.info("wrote %.1f MB of weights in %s", writer.total_bytes / 1e6, ", ".join(files))


def floating_keys(config) -> set[str]:
    """The keys of a composite of `config` that hold floating-point values (built on the meta device: no memory);
    the others are integer buffers such as BatchNorm's `num_batches_tracked`."""
    with torch.device("meta"):
        model = CompositeMLLMForCausalLM(config)
    return {key for key, value in model.state_dict().items() if value.is_floating_point()}


def checked_output_tensor(
    key: str, tensor: torch.Tensor, reads: list[TensorRead], floating: bool, dtype: torch.dtype
) -> torch.Tensor:
    """`tensor`, the composite's `key` computed from `reads`, in `dtype` if floating; refused when a source gave
    integers where the composite needs floating-point values (or the reverse), or when it is not finite in `dtype`:
    then the source tensor that holds NaN / Inf is named, or else the merge itself overflowed."""
    if floating:
        integers = [read for read in reads if not read.dtype.is_floating_point]
        if integers or not tensor.is_floating_point():
            what = integers[0].describe() if integers else f"the composite's {key!r}"
            got = integers[0].dtype if integers else tensor.dtype
            raise ConversionError(
                f"{what} holds {got} values where the composite needs floating-point weights ({key}); the checkpoint "
                "does not hold what its format says."
            )
        tensor = tensor.to(dtype)
        bad = non_finite_count(tensor)
        if bad:
            for read in reads:
                message = read.non_finite_message()
                if message is not None:
                    raise ConversionError(message)
            raise ConversionError(
                f"Tensor {key!r} of the composite comes out with {bad} NaN or infinite value(s) in {dtype} although "
                "every source tensor is finite: the merge overflows. Check the sources' `weight` in the recipe."
            )
    elif tensor.is_floating_point():
        names = ", ".join(read.describe() for read in reads) or key
        raise ConversionError(f"{names} holds {tensor.dtype} values where the composite keeps integers ({key}).")
    return tensor


_CHAT_TEMPLATE_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]


def check_chat_template(processor: CompositeMLLMProcessor) -> None:
    """Compile the composite's chat template and render a plain exchange with it, as training and inference will:
    a template that fails does so now, not in a user's `apply_chat_template`."""
    tokenizer, template = processor.tokenizer, processor.chat_template
    try:
        tokenizer.apply_chat_template(_CHAT_TEMPLATE_PROBE, chat_template=template, tokenize=False)
        tokenizer.apply_chat_template(
            _CHAT_TEMPLATE_PROBE[:1], chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except jinja2.TemplateSyntaxError as error:
        raise ConversionError(
            f"chat_template is not a valid Jinja template (line {error.lineno}: {error.message}); fix it, or use one "
            f"of the named templates {list(CHAT_TEMPLATE_NAMES)}."
        ) from None
    except Exception as error:  # anything a template raises while rendering (undefined names, raise_exception, ...)
        raise ConversionError(
            f"chat_template fails on a plain user/assistant exchange ({type(error).__name__}: {error}); fix it, or "
            f"use one of the named templates {list(CHAT_TEMPLATE_NAMES)}."
        ) from error


def _write_metadata(
    plan: Plan,
    processor: CompositeMLLMProcessor,
    folder: Path,
    base: BaseModel,
    recipe: Recipe,
    push_to_hub: str | None,
    output: Path,
) -> None:
    recipe_text = public_recipe_text(recipe.text)
    try:
        config = plan.config
        config.architectures = ["CompositeMLLMForCausalLM"]
        config.auto_map = composite_auto_map()
        config.save_pretrained(folder)
        _generation_config(base, plan).save_pretrained(folder)
        # Records `auto_map` in the processor files, so that AutoProcessor finds the remote classes.
        register_processor_auto_classes(processor)
        processor.save_pretrained(folder)
        package = Path(modeling_composite.__file__).parent
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(package / name, folder / name)
        (folder / RECIPE_FILE).write_text(recipe_text)
        card = render_model_card(_card_info(plan, recipe, recipe_text, push_to_hub, output))
        card.save(folder / "README.md")
    except OSError as error:
        raise _write_failed(error) from error
    except Exception as error:
        # The tokenizers library reports its own write errors ("No space left on device (os error 28)") as plain
        # `Exception`; anything more specific is not a write error.
        if type(error) is not Exception:
            raise
        raise _write_failed(error) from error


def _write_failed(error: BaseException) -> ConversionError:
    return ConversionError(f"Writing the composite failed ({error}); check the free space and permissions.")


def _generation_config(base: BaseModel, plan: Plan) -> GenerationConfig:
    if (base.location.folder / "generation_config.json").is_file():
        try:
            generation = GenerationConfig.from_pretrained(base.location.folder)
        except Exception as error:  # a damaged file of the base's, whatever transformers makes of it
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConversionError(f"{base.label}: cannot read its generation_config.json ({problem}).") from error
    else:
        generation = GenerationConfig.from_model_config(plan.config.get_text_config())
    tokenizer = plan.tokenizer
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, field) is None and getattr(tokenizer, field) is not None:
            setattr(generation, field, getattr(tokenizer, field))
    generation.suppress_tokens = placeholder_suppression(plan.config, generation)
    return generation


def _chat_template(template: str | None, modalities: dict[str, dict]) -> str:
    """The recipe's `chat_template`: a name of [`CHAT_TEMPLATE_NAMES`] (`vicuna_v1` for the paper's composites), a
    Jinja template, or nothing (the default template)."""
    if template is None or template in CHAT_TEMPLATE_NAMES:
        return named_chat_template(template or "default", modalities)
    return template


def image_processor_overrides(shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The settings with which the composite's one image processor (`shared`, as a dict) processes a modality's
    images as that source's own processor (`own`) does: those that differ, and every step (`do_*`) that `own` lacks
    altogether turned off (SigLIP's processor has no centre crop, so the CLIP one must not crop its images)."""
    differing = {key: own[key] for key in CLIP_IMAGE_SETTINGS if key in own and own[key] != shared.get(key)}
    missing_steps = [
        key for key in CLIP_IMAGE_SETTINGS if key.startswith("do_") and key not in own and shared.get(key)
    ]
    return {**differing, **dict.fromkeys(missing_steps, False)}


def _processor(plan: Plan, recipe: Recipe) -> CompositeMLLMProcessor:
    """One image processor (the first image/video source's) and one feature extractor (the first audio source's);
    modalities whose own image processor differs get their settings as per-modality overrides."""
    image_processors = {
        name: part.image_processor for name, (_, part) in plan.modalities.items() if part.image_processor is not None
    }
    feature_extractors = [
        part.feature_extractor for _, part in plan.modalities.values() if part.feature_extractor is not None
    ]
    image_processor = next(iter(image_processors.values()), None) or clip_image_processor()
    feature_extractor = feature_extractors[0] if feature_extractors else WhisperFeatureExtractor()
    if any(extractor.to_dict() != feature_extractor.to_dict() for extractor in feature_extractors):
        raise ConversionError(
            "The audio sources use different feature extractors; composing them is not supported yet."
        )
    shared = image_processor.to_dict()
    overrides = {}
    for name, processor in image_processors.items():
        differing = image_processor_overrides(shared, processor.to_dict())
        if differing:
            overrides[name] = differing
    modalities = plan.config.processor_modalities(overrides)
    # Sources' processor files may point at remote code of their own (`auto_map`); none of it may reach a composite
    # that users load with trust_remote_code=True.
    for part in (image_processor, feature_extractor):
        if hasattr(part, "auto_map"):
            del part.auto_map
    plan.tokenizer.init_kwargs.pop("auto_map", None)
    return CompositeMLLMProcessor(
        image_processor=image_processor,
        feature_extractor=feature_extractor,
        tokenizer=plan.tokenizer,
        modalities=modalities,
        chat_template=_chat_template(recipe.chat_template, modalities),
    )


def _card_info(plan: Plan, recipe: Recipe, recipe_text: str, repo_id: str | None, output: Path) -> CardInfo:
    """What the card states, read from the provenance recorded in the config, so card and config cannot disagree."""
    config = plan.config
    composition = config.composition
    return CardInfo(
        name=recipe.name or (repo_id.split("/")[-1] if repo_id else "composite"),
        method=recipe.method,
        rule=recipe.merge.rule,
        density=recipe.merge.density,
        seed=recipe.merge.seed,
        merge_options=recipe.merge.provenance(),
        base=CardSource(**composition["base"], format="base", modalities={}, weight=1.0),
        text_routing=composition.get("routing", {}).get("text"),
        sources=[CardSource(**source) for source in composition["sources"]],
        modalities={
            name: {
                "kind": entry.kind,
                "encoder": entry.encoder["model_type"],
                "placeholder": entry.placeholder,
                "positions_per_item": config.positions_per_item(name),
                "lora_rank": entry.lora["r"] if entry.lora else None,
            }
            for name, entry in config.modalities.items()
        },
        recipe_yaml=recipe_text,
        repo_id=repo_id,
        # By name, not by absolute path: the card must not publish where the user's files live (it may be uploaded
        # by hand later); the snippets run from the folder that holds the composite.
        folder=output.name,
        license=recipe.license,
        # Modalities from the paper's checkpoints: say what their encoders are and where preprocessing differs.
        notes=paper_notes(
            [
                kind
                for source in composition["sources"]
                if source["format"] == "modelcompose"
                for kind in source["modalities"].values()
            ]
        ),
    )
