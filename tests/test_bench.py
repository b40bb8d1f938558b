"""The bench scripts' own inputs: what they share with cnnopt must read as cnnopt reads it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU benchmark's path without a GPU")
def test_the_gpu_benchmark_without_a_gpu_says_so_and_its_parts_run_on_the_cpu(tmp_path):
    """No GPU: one line and exit 0 (the issue asks it). Its developer check on the CPU runs a part's code
    path end to end, here (f): a trial's images on the device against held on the host."""
    script = str(Path(__file__).resolve().parents[1] / "bench" / "gpu.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("no CUDA GPU: nothing to measure"), done
    done = subprocess.run([sys.executable, script, "--device", "cpu", "--only", "host", "--data", "synthetic",
                           "--steps", "1", "--rounds", "1", "--results", str(tmp_path / "block.md")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    block = (tmp_path / "block.md").read_text()
    assert "| held on the host / on the GPU | " in block and "not a GPU result" in block, block


def test_every_name_a_bench_script_imports_from_cnnopt_exists():
    """bench/time_budget.py and bench/gpu.py's study part imported `trial_of` from cnnopt.tracking.registry after
    it moved to cnnopt.tracking.studies: the CPU benchmark failed at its start, the GPU one only on the device, after
    its other parts had spent the device's time. Every `from cnnopt... import` (and search_spaces'), at the top of
    a script or inside a function, must name something that exists."""
    import ast
    import importlib
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "bench"
    checked = 0
    for script in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("cnnopt",
                                                                                                  "search_spaces"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or (hasattr(module, "__path__") and importlib.util.find_spec(
                        f"{node.module}.{alias.name}")), \
                        f"{script.name}:{node.lineno}: {node.module} has no {alias.name}"
                    checked += 1
    assert checked > 50  # the scripts' imports were found
