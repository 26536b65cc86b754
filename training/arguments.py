"""Command-line and Python arguments of the source trainer: what to build, what data, and how to train (transformers'
own `TrainingArguments`, plus the learning rates of the parameter groups)."""

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_cuda_available, is_torch_xla_available


@dataclass
class SourceModelArguments:
    """What the unimodal source is made of. Stage 1 starts from `base_model` + `encoder`; stage 2 usually starts
    from the stage-1 output (`init_from`), whose encoder and projector it keeps."""

    modality: str = field(
        metadata={"help": "Name of the modality (e.g. `image`); its inputs in the data carry this key."}
    )
    kind: str = field(metadata={"help": "Kind of the modality: image, video, audio or point."})
    base_model: str | None = field(default=None, metadata={"help": "Folder or Hub id of the base LLM (stage 1)."})
    encoder: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub id of the encoder: a CLIP/SigLIP (vision) model, a Qwen2-Audio encoder or a "
            "composite point encoder (stage 1)."
        },
    )
    init_from: str | None = field(
        default=None, metadata={"help": "A one-modality composite to continue from (the stage-1 output)."}
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "Folder with the image processor / feature extractor for the encoder (default: `encoder`)."},
    )
    placeholder: str | None = field(
        default=None, metadata={"help": "Placeholder token (default `<image>`, ... by kind)."}
    )
    projector: str = field(default="mlp2x_gelu", metadata={"help": "`linear`, `mlp{N}x_gelu` or `qformer_{Q}N_{L}L`."})
    projector_options: str | None = field(
        default=None,
        metadata={
            "help": "JSON object sizing a Q-Former projector: any of `hidden_size`, `num_attention_heads`, "
            "`intermediate_size`, `num_positions` (default: BERT-base, as the paper's)."
        },
    )
    feature_layer: str = field(
        default="last", metadata={"help": "`last`, or an index into the encoder's hidden states."}
    )
    feature_select: str = field(default="full", metadata={"help": "`patch` drops the CLS feature, `full` keeps all."})
    num_frames: int | None = field(default=None, metadata={"help": "Frames per video (video only)."})
    prefix_tokens: int = field(default=0, metadata={"help": "Learnable tokens before each item (stage 2)."})
    suffix_tokens: int = field(default=0, metadata={"help": "Learnable tokens after each item (stage 2)."})
    decoupled: bool = field(
        default=True,
        metadata={
            "help": "Parameter decoupling (DAMC): a text LoRA for text tokens and a modality LoRA for this "
            "modality's tokens. `--decoupled false` trains one shared LoRA for all tokens (NaiveMC)."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "Rank of the text and the modality LoRA (stage 2)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha / rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input while training."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Linear layers of the LLM that get LoRA (default: the 7 Llama projections)."}
    )


@dataclass
class SourceDataArguments:
    data_path: str = field(
        metadata={
            "help": "JSON list in the paper's format: `conversations` (`from`: human/gpt, `value`) and "
            "`modal_inputs` (modality -> list of file paths)."
        }
    )
    media_root: str | None = field(default=None, metadata={"help": "Folder that relative media paths start from."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message put before every conversation."})
    model_max_length: int = field(default=2048, metadata={"help": "Longer samples are refused with their id."})
    cache_samples: bool = field(
        default=False,
        metadata={
            "help": "Keep every sample's tokens and processed inputs in memory after its first epoch (memory "
            "grows with the dataset): for small datasets trained over many epochs, where loading and "
            "preprocessing the media again each epoch would cost more than the model's steps."
        },
    )


@dataclass
class SourceTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments`, plus the stage and the learning rates of the parameter groups."""

    stage: int = field(
        default=2,
        metadata={
            "help": "1: train the projector only (captions). 2: train the LoRAs, prefix/suffix tokens and the "
            "projector (instructions)."
        },
    )
    projector_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: learning_rate; 0 freezes it)."}
    )
    text_lora_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the text LoRA of a decoupled source (default: learning_rate; 0 freezes "
            "it, so that text tokens see the base LLM unchanged); the paper trains it at the projector's rate."
        },
    )
    text_distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an extra loss (0: off; beyond the paper) that pulls the source's hidden states, "
            "at a sample's last input position and every position after it, towards those of the base LLM "
            "reading the sample's `text_conversations` (the same conversation with every input written as "
            "text). Needs that field in every sample."
        },
    )
    text_distillation_teacher: str | None = field(
        default=None,
        metadata={
            "help": "The base LLM to distil from (default: the base the source was built from, as recorded in "
            "its config's `composition.base`)."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the batch has modality inputs."})
    ddp_find_unused_parameters: bool | None = field(
        default=True,
        metadata={
            "help": "`find_unused_parameters` of DistributedDataParallel (several processes). True, also with "
            "activation checkpointing (where transformers' default is False): a batch without an input of the "
            "modality (text-only samples) gives the projector, the modality LoRA and the prefix/suffix tokens "
            "no gradient, and DDP would then wait for them forever. `false` saves a graph traversal per step "
            "when every sample has an input of the modality."
        },
    )

    def __post_init__(self):
        self._check_bf16_without_gpu()
        self._no_pinned_memory_without_accelerator()
        super().__post_init__()
        for name in ("projector_learning_rate", "text_lora_learning_rate"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0 (0 freezes that group), got {value}.")
        if self.text_distillation_weight < 0:
            raise ValueError(f"--text_distillation_weight must be >= 0, got {self.text_distillation_weight}.")

    def _check_bf16_without_gpu(self) -> None:
        """transformers refuses --bf16 on a machine without a GPU ("Your setup doesn't support bf16/gpu"); say what
        to change instead, since the paper's commands carry --bf16 true."""
        wants_bf16 = self.bf16 or self.bf16_full_eval
        if (
            wants_bf16
            and not self.use_cpu
            and not is_torch_cuda_available()
            and not is_torch_xla_available()
            and not is_torch_bf16_gpu_available()
        ):
            raise ValueError(
                "--bf16 true needs a GPU with bf16 support, and this machine has none. On a CPU, drop --bf16 true "
                "(training runs in float32), or add --use_cpu true to keep bf16 autocast on the CPU."
            )

    def _no_pinned_memory_without_accelerator(self) -> None:
        """Pinned memory only speeds up copies to an accelerator; without one, torch's DataLoader warns on every run
        that it was asked for it. Turned off there, as it would do nothing."""
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; older ones only pin for CUDA
        available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        if self.dataloader_pin_memory and (self.use_cpu or not available):
            self.dataloader_pin_memory = False
