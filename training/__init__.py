"""Train unimodal sources with parameter decoupling (DAMC) or one shared LoRA (NaiveMC), from a base LLM and an
encoder, with transformers' `Trainer`. The output is a one-modality composite that the converter composes."""

import transformers

from modeling_composite.compat import TOOLS_MINIMUM_TRANSFORMERS, check_transformers_version

from .arguments import SourceDataArguments, SourceModelArguments, SourceTrainingArguments
from .trainer import SourceTrainer, train_source


# Training uses transformers APIs newer than the remote code's floor (README: Supported versions).
check_transformers_version(transformers.__version__, TOOLS_MINIMUM_TRANSFORMERS, needed_by="Training")

__all__ = ["SourceDataArguments", "SourceModelArguments", "SourceTrainer", "SourceTrainingArguments", "train_source"]
