"""Export a Predictor to TorchScript (`model.pt`) and torch.export (`model.pt2`), verified in a fresh process.

The fresh process imports only torch, as a deployment would, and both files' probabilities must match
the eager Predictor within `TOLERANCE`; otherwise the export is refused with the difference shown.
`model.pt` takes images of any size and channel count. `model.pt2` takes any batch size at the
training resolution and channel count only (a dynamic height/width through the resize exports but fails for other aspect ratios at run
time), so its callers resize first: `cnnopt.predict` does, and `input_spec.json` says so.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from cnnopt.errors import UsageError
from cnnopt.deploy.predictor import Predictor

TOLERANCE = 1e-5
CLASS_NAMES_FILE = "class_names.json"
INPUT_SPEC_FILE = "input_spec.json"  # also inside model.pt2: its fixed image size

VERIFY = r"""
import json, sys
import torch
script_path, program_path, inputs_path, out_path = sys.argv[1:5]
images = torch.load(inputs_path, weights_only=True)
scripted = torch.jit.load(script_path)
extra = {"class_names.json": ""}
program = torch.export.load(program_path, extra_files=extra).module()
with torch.no_grad():
    result = {"pt": scripted(images), "pt2": program(images)}
torch.save(result, out_path)
print(json.dumps({"cnnopt_imported": any(m.startswith("cnnopt") for m in sys.modules),
                  "class_names_pt": list(scripted.class_names), "class_names_pt2": json.loads(extra["class_names.json"])}))
"""


def export(predictor: Predictor, folder: str | Path, sample: torch.Tensor) -> dict:
    """Write model.pt and model.pt2 into `folder` and verify them on `sample` in a fresh process.

    Returns:
        {'model.pt': path, 'model.pt2': path, 'max_difference': {'pt': d, 'pt2': d}}.
    """
    with exported(predictor, folder, sample) as files:
        pass
    return files


@contextlib.contextmanager
def exported(predictor: Predictor, folder: str | Path, sample: torch.Tensor):
    """Write model.pt and model.pt2 into `folder`, then run the caller's block while a fresh process
    checks them (5-10 s, mostly importing torch: off the caller's path); the block's end waits for the
    check and raises UsageError where it failed.

    Args:
        predictor: the eager Predictor, in eval mode; its weights must not change inside the block.
        folder: where the files go.
        sample: uint8 images `(N, C, S, S)` at the training resolution (test images).
    Yields:
        {'model.pt': path, 'model.pt2': path}; 'max_difference' ({'pt': d, 'pt2': d}) is added once checked.
    """
    folder = Path(folder).resolve()  # the check's fresh process runs in a folder of its own
    folder.mkdir(parents=True, exist_ok=True)
    predictor = predictor.eval()
    script_path, program_path = folder / "model.pt", folder / "model.pt2"
    with warnings.catch_warnings():  # torch >= 2.11 warns that TorchScript is deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(predictor), str(script_path))
    batch = torch.export.Dim("batch", min=1, max=65536)
    # Traced on two images: on one, torch.export specialises the batch to 1 (a 1-image test split).
    program = torch.export.export(predictor, (sample[:2].repeat(2, 1, 1, 1)[:2],),
                                  dynamic_shapes={"images": {0: batch}})
    spec = json.dumps(input_spec(predictor), indent=2)
    torch.export.save(program, str(program_path),
                      extra_files={CLASS_NAMES_FILE: json.dumps(predictor.class_names), INPUT_SPEC_FILE: spec})
    (folder / CLASS_NAMES_FILE).write_text(json.dumps(predictor.class_names))
    (folder / INPUT_SPEC_FILE).write_text(spec)
    files = {"model.pt": str(script_path), "model.pt2": str(program_path)}
    with Verification(predictor, script_path, program_path, sample) as verification:
        yield files
        files["max_difference"] = verification.differences()


def input_spec(predictor: Predictor) -> dict:
    return {"input": "uint8 tensor (N, C, H, W), values 0-255; C = 1 (gray), 3 (RGB) or 4 (RGBA)",
            "model.pt": "any H and W: resized (shorter side) and centre-cropped inside the model",
            "model.pt2": f"H = W = {predictor.image_size} and C = {predictor.channels} only: convert channels, "
                         "resize and centre-crop before calling (cnnopt.predict does)",
            "image_size": predictor.image_size, "channels_trained": predictor.channels,
            "output": f"float32 probabilities (N, {len(predictor.class_names)}), columns in class_names order",
            "class_names": predictor.class_names}


def verify(predictor: Predictor, script_path: Path, program_path: Path, sample: torch.Tensor) -> dict:
    """Reload both files in a process that imports only torch and compare with the eager Predictor."""
    with Verification(predictor, script_path, program_path, sample) as verification:
        return verification.differences()


class Verification:
    """Both files reloaded in a process that imports only torch, as a deployment would, run on `sample`
    and compared with the eager Predictor's output (computed at the start). A context manager: the
    process starts on entry; `differences()` waits for it and checks; leaving ends it either way."""

    def __init__(self, predictor: Predictor, script_path: Path, program_path: Path, sample: torch.Tensor):
        with torch.no_grad():
            self.expected = predictor(sample)
        self.class_names = predictor.class_names
        self.paths = (script_path, program_path)
        self.sample = sample

    def __enter__(self) -> "Verification":
        self.scratch = tempfile.TemporaryDirectory()
        inputs, self.outputs = Path(self.scratch.name) / "inputs.pt", Path(self.scratch.name) / "outputs.pt"
        torch.save(self.sample, inputs)
        self.process = subprocess.Popen([sys.executable, "-c", VERIFY, *map(str, self.paths), str(inputs),
                                         str(self.outputs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=self.scratch.name)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:  # the block failed or was interrupted before waiting
            self.process.kill()
        self.process.communicate()
        self.scratch.cleanup()

    def differences(self) -> dict:
        """Wait for the fresh process; its largest difference per file, or UsageError where a file fails."""
        stdout, stderr = self.process.communicate()
        if self.process.returncode != 0:
            raise UsageError(f"the exported model failed to load in a fresh torch process: "
                             f"{stderr.strip().splitlines()[-1] if stderr.strip() else self.process.returncode}")
        report = json.loads(stdout.strip().splitlines()[-1])
        results = torch.load(self.outputs, weights_only=True)
        if report["cnnopt_imported"]:
            raise UsageError("the exported model needed cnnopt to load; it must need torch only")
        differences = {kind: float((results[kind] - self.expected).abs().max()) for kind in ("pt", "pt2")}
        for kind, difference in differences.items():
            if not difference <= TOLERANCE:
                raise UsageError(f"refusing the export: model.{kind} differs from the eager model by {difference:.3g} "
                                 f"(tolerance {TOLERANCE})")
        if report["class_names_pt"] != self.class_names or report["class_names_pt2"] != self.class_names:
            raise UsageError("refusing the export: the class names did not survive the round trip")
        return differences
