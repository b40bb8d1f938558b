"""A checkpoint: best-epoch weights plus everything needed to rebuild the model and its preprocessing.

Only plain types and tensors go in, so it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cnnopt.experiment.config import TrainConfig, make_section
from cnnopt.errors import UsageError
from cnnopt.training.model import CNN, build_model

FORMAT = "cnnopt-checkpoint-1"
FILENAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, state_dict: dict, config: TrainConfig, preprocessing: dict,
                    epoch: int, metrics: dict, threads: int) -> Path:
    """Write a checkpoint file and return its path. `threads`: the CPU threads the training ran with, 0 on a GPU
    (`objective.cpu_threads`): what the model card's command to train it again sets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "state_dict": state_dict, "train_config": dataclasses.asdict(config),
                "preprocessing": preprocessing, "epoch": epoch, "metrics": dict(metrics), "threads": threads}, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[CNN, dict]:
    """Rebuild the model from a checkpoint (weights-only load) and return it with the checkpoint dict."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot load checkpoint {path}: {exc}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UsageError(f"{path} is not a cnnopt checkpoint (expected format {FORMAT})")
    config = make_section(TrainConfig, checkpoint["train_config"], "checkpoint train_config")
    model = build_model(config, checkpoint["preprocessing"])
    model.load_state_dict(checkpoint["state_dict"])
    checkpoint["config"] = config
    return model.eval(), checkpoint
