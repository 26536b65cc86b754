"""Command line of the source trainer. Every `TrainingArguments` flag works; one `.json` or `.yaml` file may hold all
arguments instead.

    python -m training --stage 1 --modality image --kind image --base_model BASE --encoder CLIP \
        --data_path captions.json --media_root media --output_dir out/image-stage1 --learning_rate 1e-3
    python -m training --stage 2 --modality image --kind image --init_from out/image-stage1 --prefix_tokens 5 \
        --suffix_tokens 5 --data_path instructions.json --media_root media --output_dir out/image-damc \
        --learning_rate 2e-4 --projector_learning_rate 2e-5 --text_lora_learning_rate 2e-5

Multi-GPU: `accelerate launch -m training ...` or `torchrun --nproc_per_node 8 -m training ... --deepspeed ds.json`.
"""

import logging
import sys

from transformers import HfArgumentParser, TrainerCallback

from conversations.data import DataError
from conversations.media import MediaError

from .arguments import SourceDataArguments, SourceModelArguments, SourceTrainingArguments
from .model import SourceModelError
from .trainer import train_source


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> int:
    """Parse `argv` (default: the command line), train, and return the exit status (2 with one line on stderr for
    bad arguments, data or models). `callbacks` go to the `Trainer`, for a script that wraps this command line."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((SourceModelArguments, SourceDataArguments, SourceTrainingArguments))
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            model_args, data_args, training_args = parser.parse_json_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            model_args, data_args, training_args = parser.parse_yaml_file(argv[0])
        else:
            model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # argument checks (ours and `TrainingArguments`'), raised while parsing
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    try:
        output = train_source(model_args, data_args, training_args, callbacks)
    except (SourceModelError, DataError, MediaError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("training").info("wrote the source to %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
