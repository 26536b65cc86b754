"""Train a unimodal source with transformers' `Trainer`: the same code runs on a CPU, one GPU, or many through
`accelerate launch` / `torchrun` / DeepSpeed, which `Trainer` handles."""

import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, set_seed

from composition.saving import register_composite_auto_classes
from conversations.data import ConversationCollator, ConversationDataset, load_samples

from .arguments import SourceDataArguments, SourceModelArguments, SourceTrainingArguments
from .distillation import hidden_state_distillation_loss, load_text_teacher
from .model import SourceModelError, build_source_model, trainable_parameter_groups
from .validation import validate_dataset


logger = logging.getLogger(__name__)


def group_learning_rates(args: SourceTrainingArguments, groups: dict[str, list]) -> dict[str, float]:
    """The learning rate of each parameter group. An unset group rate falls back to `learning_rate`; 0 freezes the
    group (for example `--text_lora_learning_rate 0`: a decoupled source whose text tokens see the base LLM
    unchanged). A shared (NaiveMC) LoRA is the source's only LoRA and always trains at the main rate."""

    def rate(value: float | None) -> float:
        return args.learning_rate if value is None else value

    rates = {
        "projector": rate(args.projector_learning_rate),
        "tokens": args.learning_rate,
        "modality_lora": args.learning_rate,
        "text_lora": rate(args.text_lora_learning_rate),
    }
    if not groups.get("modality_lora"):
        rates["text_lora"] = args.learning_rate
    return rates


class SourceTrainer(Trainer):
    """`Trainer` whose optimizer gives the projector, the modality parameters and the text LoRA their own learning
    rates (the paper trains the projector and the text LoRA slower than the modality LoRA)."""

    def __init__(self, *args, parameter_groups: dict[str, list] | None = None, text_teacher=None, **kwargs):
        self.parameter_groups = parameter_groups or {}
        # The frozen base LLM that reads the samples' text versions (`--text_distillation_weight`), or None.
        self.text_teacher = text_teacher
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # A training forward needs no KV cache; asking for none also keeps activation checkpointing from warning that
        # it turns the cache off (the saved config keeps `use_cache` for generation).
        inputs = {**inputs, "use_cache": False}
        text_version = inputs.pop("text_version", None)
        if self.text_teacher is None or text_version is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_hidden_states": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.no_grad():
            teacher = self.text_teacher(
                input_ids=text_version["input_ids"],
                attention_mask=text_version["attention_mask"],
                output_hidden_states=True,
            )
        distillation = hidden_state_distillation_loss(
            outputs.hidden_states,
            inputs["attention_mask"],
            teacher.hidden_states,
            text_version["attention_mask"],
            text_version["aligned"],
        )
        # The distillation term is a mean over this micro-batch. When `Trainer` leaves the language-model loss
        # unscaled for gradient accumulation (it was normalised by the tokens of all micro-batches instead), the
        # term takes its share here, as `Trainer` would otherwise have divided the sum.
        scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_accumulation is None:
            scaled_for_accumulation = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        share = 1.0 / getattr(self, "current_gradient_accumulation_steps", 1) if scaled_for_accumulation else 1.0
        loss = loss + self.args.text_distillation_weight * share * distillation.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.parameter_groups:
            args = self.args
            rates = group_learning_rates(args, self.parameter_groups)
            decay = set(self.get_decay_parameter_names(self.model))
            groups = []
            for group, members in self.parameter_groups.items():
                for decays in (True, False):
                    params = [parameter for name, parameter in members if (name in decay) == decays]
                    if params:
                        groups.append(
                            {
                                "params": params,
                                "lr": rates[group],
                                "weight_decay": args.weight_decay if decays else 0.0,
                            }
                        )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)


def _text_teacher(model, args: SourceTrainingArguments):
    """The base LLM to distil from: --text_distillation_teacher, else the base the source records. One that cannot be
    loaded is named with where it came from and the fix."""
    recorded = (model.config.composition or {}).get("base")
    location = args.text_distillation_teacher or recorded
    if not location:
        raise SourceModelError(
            "--text_distillation_weight needs the base LLM: pass --text_distillation_teacher (the source's config "
            "records no composition.base)."
        )
    try:
        return load_text_teacher(location, args.device, model.get_input_embeddings().weight.dtype)
    except OSError as error:
        origin = (
            "--text_distillation_teacher"
            if args.text_distillation_teacher
            else "the base LLM recorded in the source's config (composition.base)"
        )
        raise SourceModelError(
            f"The text teacher {location!r} ({origin}) cannot be loaded: {str(error).strip().splitlines()[0]} Pass "
            "--text_distillation_teacher with the base LLM's folder or Hub id."
        ) from error


def train_source(
    model_args: SourceModelArguments,
    data_args: SourceDataArguments,
    training_args: SourceTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> Path:
    """Train one stage and write the source to `training_args.output_dir`: a one-modality composite folder that
    loads with the auto classes and that the converter takes as a source (`format: composite`). `callbacks` go to
    the `Trainer` beside its own (logging, early stopping, monitoring).

    Under `torchrun` / `accelerate launch` every process runs this; `Trainer` synchronises the gradients and only
    the main process writes the folder (`TrainingArguments.should_save`)."""
    # Seed before the model exists: fresh projectors, LoRA factors and tokens are drawn from the global generator, so
    # a run must not depend on what the process did before it.
    set_seed(training_args.seed)
    model, processor = build_source_model(model_args, training_args.stage)
    # Every save (checkpoints included) writes a loadable composite folder: remote code, auto_map, processor.
    register_composite_auto_classes(model, processor)
    model.config.composition = {
        **(model.config.composition or {}),
        "method": "source",
        "decoupled": bool(model_args.decoupled) if training_args.stage == 2 else None,
        "stage": training_args.stage,
    }
    groups = trainable_parameter_groups(model, model_args.modality, training_args.stage)
    for group, rate in group_learning_rates(training_args, groups).items():
        if rate == 0 and groups.get(group):
            # Frozen, not merely unstepped: no gradient is computed for it, and it stays exactly as initialised.
            for _, parameter in groups.pop(group):
                parameter.requires_grad_(False)
            logger.info("learning rate 0: %s frozen", group)
    distilling = training_args.text_distillation_weight > 0
    dataset = ConversationDataset(
        load_samples(data_args.data_path),
        processor,
        media_root=data_args.media_root,
        system_prompt=data_args.system_prompt,
        model_max_length=data_args.model_max_length,
        with_text_version=distilling,
        cache_samples=data_args.cache_samples,
    )
    validate_dataset(dataset)  # every bad sample at once, before anything is trained or written
    text_teacher = _text_teacher(model, training_args) if distilling else None
    if getattr(training_args, "activation_checkpointing", False) or training_args.gradient_checkpointing:
        # The frozen embeddings give no gradient to checkpointed layers' inputs; this makes them require one.
        model.enable_input_require_grads()
    trainer = SourceTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=ConversationCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        parameter_groups=groups,
        text_teacher=text_teacher,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    return Path(training_args.output_dir)
