"""`python -m cnnopt.predict MODEL IMAGE_OR_FOLDER... [--top-k K]`: classify image files with an exported model.

MODEL is a `model.pt` (TorchScript) or `model.pt2` (torch.export) file, or a registered model URI such
as `models:/digits@champion`. Images of any size and mode are decoded as training decoded them (the same
code: JPEGs drafted, the resize to the model's side, gray or RGB as it trained), over one thread per core,
and classified a chunk at a time: the model sees the pixels its test accuracy was measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from cnnopt.cli import Parser, quiet_libraries, run
from cnnopt.data.decode import IMAGE_EXTENSIONS, decode_chunks, default_workers, image_files, say_not_read, unreadable
from cnnopt.errors import UsageError
from cnnopt.deploy.export import CLASS_NAMES_FILE, INPUT_SPEC_FILE

PREDICT_CHUNK = 8  # images per model call: the first lines show after 8 images, not 32 (large PNGs: seconds)


class LoadedModel:
    """A TorchScript or torch.export model behind one call: uint8 (N, channels, image_size, image_size) ->
    probabilities (N, classes)."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            inside = next((name for name in ("model.pt", "model.pt2") if (path / name).is_file()), None)
            hint = f"{path / inside}" if inside else "a model.pt, a model.pt2 or models:/NAME@champion"
            raise UsageError(f"model {path} is a folder, not a model file; pass {hint}")
        if not path.is_file():
            raise UsageError(f"model file {path} not found; pass a model.pt, a model.pt2 or models:/NAME@champion")
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path} is not a model.pt or model.pt2 file (not a torch archive)")
        told: list[str] = []  # what torch.export logs of a file it cannot read: the cause, not a console dump
        try:
            if path.suffix == ".pt2":
                extra = {CLASS_NAMES_FILE: "", INPUT_SPEC_FILE: ""}
                with logged_to(told, "torch.export"):
                    self.module = torch.export.load(str(path), extra_files=extra).module()
                self.class_names = json.loads(extra[CLASS_NAMES_FILE])
                spec = json.loads(extra[INPUT_SPEC_FILE])
                self.image_size, self.channels = int(spec["image_size"]), int(spec["channels_trained"])
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.module = torch.jit.load(str(path))
                self.class_names = list(self.module.class_names)
                self.image_size, self.channels = int(self.module.image_size), int(self.module.channels)
        except UsageError:
            raise
        except Exception as exc:
            if _is_checkpoint(path):
                raise UsageError(f"{path} is a torch.save file (a run's checkpoint/checkpoint.pt, say), not an exported "
                                 "model: pass the run's exported/model.pt or model.pt2 (python -m cnnopt.promote "
                                 "--run-id RUN exports them)") from None
            cause = told[-1].split(". ")[0] if told else (  # torch's first sentence: its others are boilerplate
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'unreadable'}")
            raise UsageError(f"{path} is not a model cnnopt exported ({cause})") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        try:
            return self.module(images)
        except Exception as exc:
            raise UsageError(f"{self.path} cannot take a {tuple(images.shape[1:])} image: "
                             f"{str(exc).strip().splitlines()[0]}") from None


def _is_checkpoint(path: Path) -> bool:
    """Whether a torch archive is a torch.save file (a pickle and its tensors) rather than an export: a
    TorchScript archive holds code/, a torch.export one its archive_format record."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/data.pkl") for name in names) and not any(
        "/code/" in name or name.endswith("archive_format") for name in names)


@contextlib.contextmanager
def logged_to(lines: list[str], name: str):
    """The logger `name`'s records during the block, as the last line of each (an exception's last line where it
    carries one), into `lines` instead of its own handlers (torch.export printed an 18-line traceback on stderr
    for a .pt2 that is no torch.export archive, before cnnopt's one line)."""
    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = self.format(record).strip()
            lines.append(text.splitlines()[-1] if text else record.getMessage())

    logger = logging.getLogger(name)
    handlers, propagate = list(logger.handlers), logger.propagate
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(Keep())
    logger.propagate = False
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = propagate


def resolve_model(spec: str, scratch: Path) -> Path:
    """A model file path, downloading a registered model (`models:/NAME@ALIAS`) first."""
    if not spec.startswith("models:/"):
        return Path(spec)
    name = spec[len("models:/"):].strip("/")
    if "@" not in name and "/" not in name:  # MLflow reads models:/NAME as a logged model's id
        raise UsageError(f"{spec} names no version or alias of the registered model {name!r}; give "
                         f"models:/{name}@champion (the alias python -m cnnopt.promote moves) or models:/{name}/VERSION")
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnopt import tracking

    quiet_libraries()  # again: MLflow put its own console handler back when it was imported, just now
    tracking.require_store(f"the registered model {spec}")
    tracking.make_client(write=False)  # a server that does not answer is said in seconds, not after MLflow's retries (~250 s)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(scratch)))
    except MlflowException as exc:
        raise UsageError(f"cannot load {spec} from {tracking.tracking_uri()}: {exc.message.splitlines()[0].rstrip('.')}; "
                         "check the name and alias (python -m cnnopt.promote registers NAME@champion)") from None
    found = sorted(local.rglob("model.pt"))
    if not found:
        from cnnopt.tracking.store import missing_artifacts

        where = missing_artifacts(_download_uri(spec))
        raise UsageError(f"{spec} holds no model.pt{where}; " + ("restore the artifact folder" if where else
                                                                   "promote a study with python -m cnnopt.promote"))
    return found[0]


def _download_uri(spec: str) -> str:
    """Where the files of `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) are kept; "" where that cannot be read."""
    import mlflow

    name, _, rest = spec[len("models:/"):].partition("@")
    client = mlflow.MlflowClient()
    try:
        version = (client.get_model_version_by_alias(name, rest).version if rest
                   else spec[len("models:/"):].rpartition("/")[2])
        name = name if rest else spec[len("models:/"):].rpartition("/")[0]
        return client.get_model_version_download_uri(name, version)
    except Exception:  # the registry cannot say: the message goes without it
        return ""


def predictions(model: LoadedModel, paths: list[Path], workers: int | None = None):
    """Yield (path, probabilities or the UsageError saying why it cannot be read) for each path, in order: the
    files decoded as training decoded them (`decode.decode_chunks`) and classified a chunk at a time. The model
    runs on the caller's torch threads less the decoding threads, at least one (the decoding holds torch to one
    meanwhile, and its threads run beside the model: on 2 cores, the model on 2 threads made the folder 1.5x
    slower). Close it where the caller may stop early (`contextlib.closing`)."""
    workers = workers or default_workers()
    threads = max(1, torch.get_num_threads() - workers)
    with contextlib.closing(decode_chunks(paths, model.channels, model.image_size, workers=workers,
                                          chunk=PREDICT_CHUNK)) as decoded:
        for chunk, images, errors in decoded:
            rows = [row for row, error in enumerate(errors) if error is None]
            probabilities = iter(())
            if rows:
                torch.set_num_threads(threads)
                try:
                    probabilities = iter(model(torch.from_numpy(images[rows])))
                finally:
                    torch.set_num_threads(1)
            for path, error in zip(chunk, errors):
                yield path, (unreadable(path, error) if error is not None else next(probabilities))


def image_paths(inputs: list[str]) -> list[Path]:
    paths, others = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files(path, others)
            if not found:  # beside other images it was skipped without a word; alone, it was an error
                raise UsageError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); name a folder of "
                                 "images, or leave it out")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"image {path} not found")
    say_not_read(others, "in the folders given")
    unique: dict[Path, Path] = {}  # an image named twice (itself and through its folder) is predicted once
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cnnopt.predict", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="model.pt, model.pt2 or models:/NAME@ALIAS")
    parser.add_argument("images", metavar="IMAGE_OR_FOLDER", nargs="+")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per image (default 3)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"argument --top-k: {args.top_k} is not a number of classes (1 or more)")
    quiet_libraries()
    paths = image_paths(args.images)
    with tempfile.TemporaryDirectory() as scratch:
        model = LoadedModel(resolve_model(args.model, Path(scratch)))
        k = max(1, min(args.top_k, len(model.class_names)))
        unread = []  # an unreadable image among many does not cost the others their predictions
        with contextlib.closing(predictions(model, paths)) as predicted:  # an error or Ctrl-C stops the decoding
            for path, probabilities in predicted:
                if isinstance(probabilities, UsageError):
                    unread.append(probabilities)
                    continue
                top = torch.topk(probabilities, k)
                shown = "  ".join(f"{model.class_names[i]} {p:.3f}"
                                  for p, i in zip(top.values.tolist(), top.indices.tolist()))
                print(f"{path}: {shown}", flush=True)
    if len(unread) == 1 and len(paths) == 1:
        raise unread[0]
    if unread:
        raise UsageError(f"{len(unread)} of {len(paths)} images could not be read (the first: {unread[0]}); "
                         + ("none was predicted" if len(unread) == len(paths) else "the others are predicted above"))
    return 0


if __name__ == "__main__":
    run(main)
