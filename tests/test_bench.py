"""The bench scripts' own inputs: what they share with cnnopt must read as cnnopt reads it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from cnnopt.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_throughput  # noqa: E402 - a script in bench/, not a package


def test_train_throughputs_set_types_its_values_as_cnnopts_own_set_does():
    """bench/README.md's command passes `--set blocks=3`: text, typed by the field (a bare string was refused
    once the experiment loader stopped parsing strings)."""
    args = argparse.Namespace(dataset="digits", overrides=["blocks=3", "train.convs_per_block=2", "flip=no"],
                              epochs=0, seed=0)
    config, _ = train_throughput.load(args)
    assert (config.blocks, config.convs_per_block, config.flip) == (3, 2, False)
    with pytest.raises(UsageError, match="--set blocks must be int, got 'many'"):
        train_throughput.load(argparse.Namespace(**{**vars(args), "overrides": ["blocks=many"]}))
