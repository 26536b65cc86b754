"""Train unimodal sources with parameter decoupling (DAMC) or one shared LoRA (NaiveMC), from a base LLM and an
encoder, with transformers' `Trainer`. The output is a one-modality composite that the converter composes."""

from .arguments import SourceDataArguments, SourceModelArguments, SourceTrainingArguments
from .trainer import SourceTrainer, train_source


__all__ = ["SourceDataArguments", "SourceModelArguments", "SourceTrainer", "SourceTrainingArguments", "train_source"]
