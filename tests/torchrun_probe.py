"""The trainer's command line under `torchrun`, with one callback that records what each process did; run by
`tests/test_training_distributed.py` as `torchrun --nproc_per_node 2 tests/torchrun_probe.py RECORD_DIR -- ARGS...`.

Each rank writes into RECORD_DIR:
- `rank{r}-local-step{s}.pt`: the gradient its own micro-batch gave each trainable parameter (a tensor hook fires
  before DDP's all-reduce adds the other rank's share);
- `rank{r}-synced-step{s}.pt`: the gradients the optimizer steps with (after the all-reduce);
- `rank{r}-weights-step{s}.pt`: the trainable parameters after step s (s = 0: before training);
- `rank{r}.json`: rank, world size, backend, exit status, and every file it opened for writing under the output
  folder (a `sys.addaudithook` on `open`, `os.remove`, `os.rename`, `os.replace`, `shutil.*`).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from training.__main__ import main


class RecordRank(TrainerCallback):
    def __init__(self, folder: Path, rank: int):
        self.folder = folder
        self.rank = rank
        self.local: dict[str, torch.Tensor] = {}

    def _save(self, kind: str, step: int, tensors: dict[str, torch.Tensor]) -> None:
        torch.save(tensors, self.folder / f"rank{self.rank}-{kind}-step{step}.pt")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
        self._save("weights", 0, {name: parameter.detach().clone() for name, parameter in trainable.items()})
        for name, parameter in trainable.items():
            parameter.register_hook(
                lambda gradient, name=name: self.local.__setitem__(name, gradient.detach().clone())
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self._save("local", step, self.local)
        self.local = {}
        synced = {
            name: parameter.grad.detach().clone()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and parameter.grad is not None
        }
        self._save("synced", step, synced)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._save(
            "weights",
            state.global_step,
            {
                name: parameter.detach().clone()
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            },
        )


def _record_writes(output: Path, writes: list[str]) -> None:
    """Every path under `output` that this process opens for writing, removes or renames."""
    root = os.path.realpath(output)

    def under_output(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False  # a file descriptor, not a path

    def hook(event: str, arguments: tuple) -> None:
        if event == "open" and arguments and under_output(arguments[0]):
            mode, flags = arguments[1], arguments[2]
            writing = (mode and any(c in str(mode) for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR))
            if writing:
                writes.append(f"open {os.fsdecode(arguments[0])}")
        elif (
            event in ("os.remove", "os.rename", "os.replace", "os.mkdir", "shutil.rmtree", "shutil.move")
            and arguments
            and under_output(arguments[0])
        ):
            writes.append(f"{event} {os.fsdecode(arguments[0])}")

    sys.addaudithook(hook)


def run() -> int:
    separator = sys.argv.index("--")
    folder, argv = Path(sys.argv[1]), sys.argv[separator + 1 :]
    rank = int(os.environ["RANK"])
    output = Path(argv[argv.index("--output_dir") + 1])
    writes: list[str] = []
    _record_writes(output, writes)
    status = main(argv, callbacks=[RecordRank(folder, rank)])
    record = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "status": status,
        "writes": writes,
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(run())
