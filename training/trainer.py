"""Train a unimodal source with transformers' `Trainer`: the same code runs on a CPU, one GPU, or many through
`accelerate launch` / `torchrun` / DeepSpeed, which `Trainer` handles."""

import logging
from pathlib import Path

from transformers import Trainer, set_seed

from modeling_composite.builder import register_composite_auto_classes

from .arguments import SourceDataArguments, SourceModelArguments, SourceTrainingArguments
from .data import ConversationCollator, ConversationDataset, load_samples
from .model import build_source_model, trainable_parameter_groups


logger = logging.getLogger(__name__)


def group_learning_rates(args: SourceTrainingArguments, groups: dict[str, list]) -> dict[str, float]:
    """The learning rate of each parameter group. An unset group rate falls back to `learning_rate`; 0 freezes the
    group (for example `--text_lora_learning_rate 0`: a decoupled source whose text tokens see the base LLM
    unchanged). A shared (NaiveMC) LoRA is the source's only LoRA and always trains at the main rate."""
    def rate(value: float | None, name: str) -> float:
        if value is None:
            return args.learning_rate
        if value < 0:
            raise ValueError(f"--{name} must be >= 0 (0 freezes that group), got {value}.")
        return value

    rates = {
        "projector": rate(args.projector_learning_rate, "projector_learning_rate"),
        "tokens": args.learning_rate,
        "modality_lora": args.learning_rate,
        "text_lora": rate(args.text_lora_learning_rate, "text_lora_learning_rate"),
    }
    if not groups.get("modality_lora"):
        rates["text_lora"] = args.learning_rate
    return rates


class SourceTrainer(Trainer):
    """`Trainer` whose optimizer gives the projector, the modality parameters and the text LoRA their own learning
    rates (the paper trains the projector and the text LoRA slower than the modality LoRA)."""

    def __init__(self, *args, parameter_groups: dict[str, list] | None = None, **kwargs):
        self.parameter_groups = parameter_groups or {}
        super().__init__(*args, **kwargs)

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
                        groups.append({"params": params, "lr": rates[group], "weight_decay": args.weight_decay if decays else 0.0})
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)


def train_source(
    model_args: SourceModelArguments, data_args: SourceDataArguments, training_args: SourceTrainingArguments
) -> Path:
    """Train one stage and write the source to `training_args.output_dir`: a one-modality composite folder that
    loads with the auto classes and that the converter takes as a source (`format: composite`)."""
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
    dataset = ConversationDataset(
        load_samples(data_args.data_path),
        processor,
        media_root=data_args.media_root,
        system_prompt=data_args.system_prompt,
        model_max_length=data_args.model_max_length,
    )
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
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    return Path(training_args.output_dir)
