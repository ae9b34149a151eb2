"""Which checkpoint of a run folder is complete, and which one to resume from.

transformers' Trainer writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG states) and
`trainer_state.json` last, so a checkpoint with a readable one is complete; a crash mid-write leaves it missing
or unparseable, and such a folder is never resumed from.
"""

import json
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def checkpoint_is_complete(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_step(path: Path) -> int:
    """checkpoint-1200 -> 1200."""
    return int(path.name.split("-")[-1])


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint-N folder, newest first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = (p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit())
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_complete_checkpoint(output_dir: str | Path, announce: bool = True) -> Path | None:
    for checkpoint in checkpoints(output_dir):
        if checkpoint_is_complete(checkpoint):
            return checkpoint
        if announce:
            print(f"ignoring incomplete checkpoint {checkpoint} (interrupted while it was written)")
    return None


def arguments_as_json(folder: str | Path, args) -> None:
    """Keep a folder's training arguments as `training_args.json`, never as transformers' `training_args.bin`
    (a `torch.save` pickle: loading it runs code). transformers 5.23 writes the pickle into every checkpoint and
    into `save_model`'s folder, and never reads it back to resume (`trainer_state.json` and the weights do that)."""
    from transformers.trainer import TRAINING_ARGS_NAME

    folder = Path(folder)
    (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    (folder / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
