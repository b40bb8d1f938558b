"""Promotion: one test evaluation, verified exports, the registry's champion alias, and the predict command."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnopt.deploy import promotion as promote_module
from cnnopt.tracking import registry
from cnnopt import promote as promote_cli, search, tracking
from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.errors import UsageError
from cnnopt.deploy.export import export, exported, verify
from cnnopt.training.model import build_model
from cnnopt.training.objective import train
from cnnopt.deploy.predictor import Predictor


@pytest.fixture(scope="module")
def trained(digits_data):
    """A digits model trained for 3 epochs, and its Predictor."""
    config = TrainConfig(epochs=3)
    result = train(config, digits_data)
    model = build_model(config, digits_data.preprocessing())
    model.load_state_dict(result.state_dict)
    return model.eval(), Predictor(model, digits_data.preprocessing()).eval()


def test_study_promotes_its_best_trial_once(ray_session, mlflow_store, monkeypatch, capsys, tmp_path):
    calls = []
    real = promote_module.evaluate_test
    monkeypatch.setattr(promote_module, "evaluate_test", lambda *a: calls.append(1) or real(*a))
    assert search.main(["--strategy", "random", "--trials", "2", "--name", "p", "--set", "train.epochs=2",
                        "--set", "data.seed=1", "--no-confirm", "--no-report"]) == 0
    assert len(calls) == 1, "the test split is evaluated once, for the promoted trial only"
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.get_experiment_by_name("digits").experiment_id
    trials = client.search_runs([experiment_id], "tags.`cnnopt.kind` = 'trial'")
    # the best by val accuracy; on a tie, the lowest trial number
    best = min(trials, key=lambda r: (-r.data.metrics["best_val_accuracy"], int(r.data.tags["trial_number"])))
    assert "test_accuracy" in best.data.metrics and "test_accuracy_class_3" in best.data.metrics
    assert [r for r in trials if "test_accuracy" in r.data.metrics] == [best] or len(trials) == 1
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id, "exported")}
    assert {f"exported/{n}" for n in ("model.pt", "model.pt2", "class_names.json", "input_spec.json",
                                       "model_card.md")} <= artifacts
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(best.info.run_id)}
    champion = client.get_model_version_by_alias("digits", "champion")
    assert champion.run_id == best.info.run_id
    parent = client.get_run(best.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["promoted_run_id"] == best.info.run_id
    assert parent.data.metrics["promoted_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    output = capsys.readouterr().out
    assert "alias 'champion' now points to it" in output
    # What was promoted, in words: a plain `cnnopt.promote` chose a study and a trial and named neither (QA).
    assert f"promoted run {best.info.run_id} (study 'p', trial {best.data.tags['trial_number']}): test_accuracy" in output
    # In pandas the promoted trial's test figures keep their names (they read as last-epoch values, last_test_*).
    from cnnopt.analysis import load_trials

    frame = load_trials("digits", "p").set_index("run_id")
    assert not [column for column in frame if column.startswith("last_test")], list(frame)
    assert frame.at[best.info.run_id, "test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    assert frame.drop(index=best.info.run_id)["test_accuracy"].isna().all()
    assert {"last_val_accuracy", "best_val_accuracy", "test_accuracy_class_3"} <= set(frame)
    # Resuming the finished study runs nothing new: its best trial is not evaluated on test again, and nothing
    # starts (no study line, no report rebuilt): one line says it is complete and how to redo each part of it.
    assert search.main(["--resume", "--name", "p"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and out.startswith(
        f"study 'p' is complete: it promoted run {best.info.run_id} (test accuracy "
        f"{best.data.metrics['test_accuracy']:.4f}); nothing is left to resume. Its report again: python -m "
        f"cnnopt.report --study p; a promotion again, on purpose: python -m cnnopt.promote --run-id {best.info.run_id}")
    assert out.count("\n") == 1, out
    assert len(client.search_model_versions("name='digits'")) == 1
    # A study promotes once: promoting it again by its name is refused before the test split is read, and says
    # how to do it on purpose. Named by --run-id, from another experiment file and with no --set, the run's
    # recorded settings give the split it trained on (data.seed=1) and the registered name, and the output
    # says the test split was evaluated again. A --set that changes the split is refused before the test split
    # is touched.
    other = tmp_path / "other.toml"
    other.write_text('name = "other"\n')
    with pytest.raises(UsageError, match=f"study 'p' promoted run {best.info.run_id} already.*--run-id"):
        promote_cli.main(["--experiment", str(other), "--study", "p"])
    assert len(calls) == 1
    capsys.readouterr()
    assert promote_cli.main(["--experiment", str(other), "--run-id", best.info.run_id]) == 0
    assert "(test split evaluated again: the run was promoted before; read 2 times for study 'p')" in capsys.readouterr().out
    assert len(calls) == 2 and len(client.search_model_versions("name='digits'")) == 2
    assert not client.search_registered_models("name='other'"), "registered under the run's own experiment"
    with pytest.raises(UsageError, match="another split than its recorded settings load now with the --set values"):
        promote_cli.main(["--run-id", best.info.run_id, "--set", "data.seed=2"])
    assert len(calls) == 2
    with pytest.raises(UsageError, match="belongs to MLflow experiment 'digits', not 'renamed'"):  # its own name
        promote_cli.main(["--run-id", best.info.run_id, "--set", "name=renamed"])
    assert len(calls) == 2
    with pytest.raises(UsageError, match="study name \"p'\" is not allowed"):  # never an MLflow filter's traceback
        promote_cli.main(["--study", "p'"])
    # The study's parent run named by --run-id: it said "no checkpoint artifact", not what to pass instead.
    with pytest.raises(UsageError, match=f"run {parent.info.run_id} has no checkpoint artifact to promote; it is "
                                         "study 'p''s parent run: promote the study with --study p"):
        promote_cli.main(["--run-id", parent.info.run_id])
    # A cnnopt.train run interrupted before its checkpoint: it was told to pass "a cnnopt.train run" (QA).
    cut = client.create_run(client.get_experiment_by_name("digits").experiment_id,
                            tags={"cnnopt.kind": "train", "status": "interrupted"}).info.run_id
    with pytest.raises(UsageError, match=f"run {cut} has no checkpoint artifact to promote; it was interrupted "
                                         "before its checkpoint was saved: pass a run that completed"):
        promote_cli.main(["--run-id", cut])
    with pytest.raises(SystemExit) as usage:  # an empty $RUN_ID promoted the latest study's best trial instead
        promote_cli.main(["--run-id", ""])
    assert usage.value.code == 2 and "argument --run-id: empty" in capsys.readouterr().err
    # Another run of the promoted study: its test split would be read again for another model (a choice by test
    # accuracy), so only on purpose; then the output, the model card and the study's record say how many reads.
    [second] = [r for r in trials if r.info.run_id != best.info.run_id]
    with pytest.raises(SystemExit) as usage:  # --retest names nothing by itself
        promote_cli.main(["--study", "p", "--retest"])
    assert usage.value.code == 2 and "--retest goes with --run-id" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"study 'p' promoted run {best.info.run_id} already.*promoting run "
                                         f"{second.info.run_id} too would read it again.*add --retest"):
        promote_cli.main(["--run-id", second.info.run_id])
    assert len(calls) == 2
    assert promote_cli.main(["--run-id", second.info.run_id, "--retest"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 3 and "(test split evaluated again; read 3 times for study 'p')" in out
    card = Path(client.download_artifacts(second.info.run_id, "exported/model_card.md", str(tmp_path)))
    assert "the study's test split read 3 times, by as many promotions" in card.read_text()
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["test_reads"] == "3" and parent.data.tags["promoted_run_id"] == second.info.run_id
    # The card's command trains the trial again to the very same numbers: on the CPU with the threads the trial
    # trained with (QA: run on every core, a trial's 0.9926 came out 0.9851; a CPU's sums depend on their split).
    card = Path(client.download_artifacts(best.info.run_id, "exported/model_card.md", str(tmp_path))).read_text()
    command = shlex.split(card.splitlines()[card.splitlines().index("## Reproduce") + 2])
    threads = torch.load(checkpoint_of(client, best, tmp_path), weights_only=True)["threads"]
    assert command[0] == f"OMP_NUM_THREADS={threads}"
    assert command[1:4] == ["python", "-m", "cnnopt.train"], command
    again = subprocess.run([sys.executable, *command[2:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, command[0].split("=")[0]:
                                command[0].split("=")[1]})
    assert again.returncode == 0, again.stdout + again.stderr
    [retrained] = [run for run in client.search_runs([experiment_id], "tags.`cnnopt.kind` = 'train'")
                   if run.info.run_id != cut]  # the interrupted one made above

    def losses(run) -> list[float]:
        return [point.value for point in sorted(client.get_metric_history(run.info.run_id, "train_loss"),
                                                key=lambda point: point.step)]

    assert losses(retrained) == losses(best) and len(losses(best)) == 2, (losses(retrained), losses(best))


def checkpoint_of(client: MlflowClient, run, folder: Path) -> str:
    return client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(folder))  # not left in /tmp


def test_a_class_with_no_test_image_has_no_per_class_accuracy(trained, digits_data):
    """It was logged as test_accuracy_class_<name> = 0.0, as if every one of its images were wrong."""
    import dataclasses

    model, _ = trained
    kept = digits_data.test_y != 7
    data = dataclasses.replace(digits_data, test_x=digits_data.test_x[kept], test_y=digits_data.test_y[kept])
    result = promote_module.evaluate_test(model, data)
    assert "7" not in result["per_class"] and set(result["per_class"]) == set(digits_data.class_names) - {"7"}
    assert result["confusion"][7].sum() == 0 and min(result["per_class"].values()) > 0.5


def test_exports_reload_in_a_fresh_process_and_match(trained, digits_data, tmp_path):
    _, predictor = trained
    files = export(predictor, tmp_path, digits_data.test_x[:64])
    assert max(files["max_difference"].values()) <= 1e-5
    broken = Predictor(build_model(TrainConfig(epochs=3), digits_data.preprocessing()), digits_data.preprocessing())
    with pytest.raises(UsageError, match="refusing the export"):
        verify(broken.eval(), tmp_path / "model.pt", tmp_path / "model.pt2", digits_data.test_x[:64])


def test_an_export_is_refused_where_its_class_names_or_its_torch_only_load_do_not_hold(trained, digits_data, tmp_path,
                                                                                        monkeypatch):
    _, predictor = trained
    sample = digits_data.test_x[:16]
    export(predictor, tmp_path, sample)
    renamed = Predictor(predictor.model, {**digits_data.preprocessing(),
                                          "class_names": [f"digit {name}" for name in digits_data.class_names]})
    with pytest.raises(UsageError, match="class names did not survive"):  # same outputs, other names
        verify(renamed.eval(), tmp_path / "model.pt", tmp_path / "model.pt2", sample)
    # A fresh process in which loading the model brings cnnopt in (here a sitecustomize that imports it): a
    # deployment without cnnopt could not load it.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import cnnopt\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).resolve().parents[1])]))
    with pytest.raises(UsageError, match="needed cnnopt to load"):
        verify(predictor, tmp_path / "model.pt", tmp_path / "model.pt2", sample)


def test_deployment_sees_the_pixels_training_saw(trained, digits_data, tmp_path, monkeypatch):
    """model.pt (resizing inside) and training's decode resize, composite and scale an image to the same pixels,
    and cnnopt.predict hands model.pt and model.pt2 training's decode: the exported model predicts what the
    evaluated one did."""
    from cnnopt.data.decode import decode_image, resize_center_crop
    from cnnopt.predict import LoadedModel, predictions

    _, predictor = trained
    monkeypatch.chdir(tmp_path)
    export(predictor, "relative", digits_data.test_x[:1])  # a relative folder, a 1-image test split
    script, program = torch.jit.load("relative/model.pt"), LoadedModel(Path("relative/model.pt2"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for height, width in ((20, 30), (13, 8), (64, 48)):  # resized inside model.pt, by predict for model.pt2
            images = torch.randint(0, 256, (2, 1, height, width), dtype=torch.uint8, generator=generator)
            trained_on = predictor(resize_center_crop(images, 8))
            assert torch.allclose(script(images), trained_on, atol=1e-6)
            assert torch.allclose(program(resize_center_crop(images, 8)), trained_on, atol=1e-6)
        # A gray PNG whose black is transparent (a tRNS key), and a dark 16-bit one: decoded as training did.
        digit = digits_data.test_x[0, 0].numpy()
        Image.fromarray(digit, "L").save("keyed.png", transparency=0)
        Image.fromarray(digit.astype(np.uint16)).save("deep.png")  # 16 bits, none above 255
        # 16 bits over the whole range, with a key: scaled (not clipped to white), its keyed pixels white.
        wide = digit.astype(np.uint16) * 257
        Image.fromarray(wide).save("deep-keyed.png", transparency=int(wide[0, 0]))
        for name in ("keyed.png", "deep.png", "deep-keyed.png"):
            decoded = torch.from_numpy(decode_image(Path(name), 1, 8)).unsqueeze(0)
            for loaded in (LoadedModel(Path("relative/model.pt")), program):  # what cnnopt.predict classifies
                (_, predicted), = predictions(loaded, [Path(name)])
                assert torch.allclose(predicted, predictor(decoded)[0], atol=1e-6), name
        assert decode_image(Path("deep.png"), 1, 8).max() <= 1, "scaled by its depth: 255 of 65535 is dark"
        keyed = decode_image(Path("deep-keyed.png"), 1, 8)[0]
        assert (keyed[wide == wide[0, 0]] == 255).all() and np.array_equal(keyed[wide != wide[0, 0]],
                                                                             digit[wide != wide[0, 0]])


def test_a_flip_tta_model_exports_and_reloads_with_its_mirror(trained, digits_data, tmp_path):
    model, _ = trained
    mirrored = build_model(TrainConfig(epochs=3, tta="flip"), digits_data.preprocessing())
    mirrored.load_state_dict(model.state_dict())
    predictor = Predictor(mirrored, digits_data.preprocessing()).eval()
    files = export(predictor, tmp_path, digits_data.test_x[:64])
    assert max(files["max_difference"].values()) <= 1e-5
    reloaded = torch.jit.load(str(tmp_path / "model.pt"))
    images = digits_data.test_x[:8]
    with torch.no_grad():
        assert torch.allclose(reloaded(images), reloaded(images.flip(3)), atol=1e-6), "the mirror is averaged in"


def test_the_fresh_process_check_runs_beside_the_block_and_a_failing_block_keeps_its_error(trained, digits_data,
                                                                                           tmp_path):
    _, predictor = trained
    with exported(predictor, tmp_path / "ok", digits_data.test_x[:16]) as files:
        assert Path(files["model.pt"]).is_file() and "max_difference" not in files  # written; checked at the end
    assert max(files["max_difference"].values()) <= 1e-5
    with pytest.raises(RuntimeError, match="the test pass failed"):
        with exported(predictor, tmp_path / "cut", digits_data.test_x[:16]) as files:
            raise RuntimeError("the test pass failed")
    assert "max_difference" not in files


def test_predictor_takes_other_sizes_and_modes(trained, digits_data):
    model, predictor = trained
    x = digits_data.test_x[:8]
    with torch.no_grad():
        direct = torch.softmax(model((x.float() / 255 - predictor.mean) / predictor.std), 1)
        assert torch.allclose(predictor(x), direct, atol=1e-6)
        rgb = x.expand(-1, 3, -1, -1)  # gray digits as RGB: converted back to gray exactly
        assert torch.allclose(predictor(rgb), direct, atol=1e-5)
        rgba = torch.cat([rgb, torch.full_like(x, 255)], 1)  # opaque alpha changes nothing
        assert torch.allclose(predictor(rgba), direct, atol=1e-5)
        for size in ((16, 16), (20, 31), (40, 12)):
            big = torch.nn.functional.interpolate(x.float(), size=size).round().to(torch.uint8)
            probabilities = predictor(big)
            assert probabilities.shape == (8, 10)
            assert torch.allclose(probabilities.sum(1), torch.ones(8), atol=1e-5)


def test_colour_to_gray_and_alpha_match_pillow_pixel_for_pixel():
    """A gray model's Predictor converts colour images as training's decode did (PIL's convert('L'), fixed
    point), and composites alpha on white as PIL's alpha_composite: on every one of 65,536 random pixels."""
    from cnnopt.deploy.predictor import match_channels

    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    rgba = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float()
    gray = np.asarray(Image.fromarray(pixels[..., :3]).convert("L"))
    assert np.array_equal(match_channels(rgba[:, :3], 1)[0, 0].numpy(), gray)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    on_white = np.asarray(Image.alpha_composite(white, Image.fromarray(pixels)).convert("L"))
    assert np.array_equal(match_channels(rgba, 1)[0, 0].numpy(), on_white)


def test_champion_moves_unless_validation_says_the_champion_is_better(trained, digits_data, mlflow_store, tmp_path):
    """The alias used to move only to a version with at least the champion's test accuracy: the test split chose
    between models, and the champion's test figure was the best of several looks. Validation chooses now."""
    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    experiment = load_experiment(None, ["name=champions"])
    client = tracking.make_client()
    fresh = lambda: tracking.start_run(client, experiment, "r")  # a run per promotion, as a study has  # noqa: E731
    score = 475 / 484  # 0.98140495...: its tag reads 0.981405, above it (a re-promotion of one run tied it)

    def register(test_accuracy, val_score, test_split="split-a", val_split="val-a"):
        return registry.register(experiment, fresh(), tmp_path / "model", test_accuracy, test_split, val_score, val_split)

    assert register(0.90, score) == ("1", True, None, "")
    lucky = register(0.99, 0.95)  # a better test accuracy, a worse validation score: it stays off the alias
    assert lucky[:3] == ("2", False, "1") and lucky.reason.startswith(
        "whose validation val_accuracy is better (0.9814 against 0.9500; the test split does not choose")
    assert "set_registered_model_alias('champions', 'champion', 2)" in lucky.reason
    assert register(0.80, score) == ("3", True, "1", "")  # as good on validation: the newest serves
    assert register(0.70, 0.99) == ("4", True, "3", ""), "a better validation score moves it, whatever the test says"
    assert register(0.95, 0.50, val_split="val-b") == (
        "5", True, "4", "not compared on validation: version 4 was selected on another val split")
    assert register(0.60, None) == ("6", True, "5", "not compared on validation: this version has no validation "
                                                    "score (a train+val final, or a train_* metric)"), "the newest"
    version = client.get_model_version("champions", "4")
    assert version.tags["val_score"] == "0.990000" and version.tags["selected_on"] == "val_accuracy"
    assert version.tags["val_split"] == "val-a" and "val_score" not in client.get_model_version("champions", "6").tags
    # Another test split (the experiment's folder now holds other images or classes): no comparison, no move.
    other = register(1.0, 1.0, test_split="split-b")
    assert other[:3] == ("7", False, "6") and "another test split" in other.reason
    assert "set_registered_model_alias('champions', 'champion', 7)" in other.reason
    assert str(client.get_model_version_by_alias("champions", "champion").version) == "6"
    assert client.get_model_version("champions", "7").tags["test_split"] == "split-b"
    # val_loss is minimised: a lower score is the better one.
    losses = load_experiment(None, ["name=losses", "metric=val_loss"])
    first = registry.register(losses, fresh(), tmp_path / "model", 0.9, "s", 0.20, "v")
    higher = registry.register(losses, fresh(), tmp_path / "model", 0.99, "s", 0.30, "v")
    assert first.moved and not higher.moved and "validation val_loss is better (0.2000 against 0.3000" in higher.reason
    # A champion registered before versions carried their validation score: nothing compares, the newest serves.
    legacy = registry.register(experiment, fresh(), tmp_path / "model", 0.5, "split-a")
    client.set_registered_model_alias("champions", "champion", legacy.version)
    after = register(0.1, 0.2)
    assert after.moved and after.reason == f"not compared on validation: version {legacy.version} carries no validation score"
    other_metric = registry.register(losses, fresh(), tmp_path / "model", 0.9, "s", 0.10, "v")
    assert other_metric.moved and not other_metric.reason  # the same metric (val_loss): compared, and better
    accuracy_again = registry.register(load_experiment(None, ["name=losses"]), fresh(), tmp_path / "model", 0.9, "s", 0.5, "v")
    assert accuracy_again.reason == ("not compared on validation: version "
                                     f"{other_metric.version} was selected on val_loss, not val_accuracy")
    # A best epoch's score against a last epoch's (a final training's): they do not compare. QA: an older final's
    # best epoch, 1.0 of 482, held the alias against every later model.
    lucky_final = register(0.96, 1.0)  # tagged best (as before the tag: versions without it read as best)
    assert lucky_final.moved
    final = registry.register(experiment, fresh(), tmp_path / "model", 0.98, "split-a", 0.9963, "val-a", "last")
    assert final.moved and final.reason == (f"not compared on validation: version {lucky_final.version}'s validation "
                                            "score is of its best epoch, this one's of its last")
    assert client.get_model_version("champions", final.version).tags["val_epoch"] == "last"
    later = registry.register(experiment, fresh(), tmp_path / "model", 0.97, "split-a", 0.99, "val-a", "last")
    assert not later.moved and "better (0.9963 against 0.9900" in later.reason, "last against last: compared"
    # Selected on a training figure (QA: a 1-epoch train_loss run, val 0.70, displaced a champion at 0.9665): it
    # does not displace a champion with a validation score; the newest-serves rule is for a train+val final's.
    on_train = registry.register(load_experiment(None, ["name=champions", "metric=train_loss"]), fresh(),
                                 tmp_path / "model", 0.99, "split-a", None, "val-a")
    assert not on_train.moved and "was selected on train_loss, a figure of the images it trained on" in on_train.reason
    assert str(client.get_model_version_by_alias("champions", "champion").version) == final.version
    # Nor one that is a train+val final (no validation score, the newest serving: its configuration was chosen on
    # validation, its selected_on says so).
    train_val = registry.register(experiment, fresh(), tmp_path / "model", 0.97, "split-a", None, "val-a", "last")
    assert train_val.moved and client.get_model_version("champions", train_val.version).tags["selected_on"] \
        == "val_accuracy"
    again = registry.register(load_experiment(None, ["name=champions", "metric=train_loss"]), fresh(),
                              tmp_path / "model", 0.70, "split-a", None, "val-a")
    assert not again.moved and "which was selected on validation" in again.reason


def test_a_promotion_cut_short_after_registering_is_resumed_with_its_version_not_a_copy(trained, digits_data,
                                                                                         mlflow_store, tmp_path):
    """A Ctrl-C between registering a run's model and tagging the run promoted left a version the resume
    registered again: two identical versions of one run."""
    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    experiment = load_experiment(None, ["name=cut"])
    client = tracking.make_client()
    run_id = tracking.start_run(client, experiment, "r")
    first = registry.register(experiment, run_id, tmp_path / "model", 0.9, "s", 0.9, "v")
    again = registry.register(experiment, run_id, tmp_path / "model", 0.9, "s", 0.9, "v")  # the resume's
    assert (first.version, again.version, again.moved) == ("1", "1", True)
    assert [str(v.version) for v in client.search_model_versions("name = 'cut'")] == ["1"]
    other = registry.register(experiment, run_id, tmp_path / "model", 0.5, "s2", 0.9, "v")  # tested on other images
    assert other.version == "2" and client.get_model_version("cut", "2").tags["test_split"] == "s2"
    client.set_tag(run_id, "promoted", "true")  # promoted: a deliberate re-promotion (--run-id) registers anew
    assert registry.register(experiment, run_id, tmp_path / "model", 0.9, "s", 0.9, "v").version == "3"


def write_digits(data, folder, count=6):
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"digit{i}.png"
        Image.fromarray(data.test_x[i, 0].numpy()).save(path)
        paths.append(path)
    return paths


def run_predict(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cnnopt.predict", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_predict_prints_the_models_top_classes(trained, digits_data, tmp_path):
    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    paths = write_digits(digits_data, tmp_path / "images")
    with torch.no_grad():
        expected = predictor(digits_data.test_x[:6]).argmax(1).tolist()
    for model_file in ("model.pt", "model.pt2"):
        done = run_predict(tmp_path / "model" / model_file, tmp_path / "images", "--top-k", "2")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 6
        predicted = [int(line.split(": ")[1].split()[0]) for line in lines]
        assert predicted == expected
        assert all(len(line.split(": ")[1].split()) == 4 for line in lines)  # two classes, two probabilities
        # An RGB copy of a gray digit goes through both files (model.pt2 is fixed to 1 channel: predict converts).
        rgb = tmp_path / "rgb.png"
        Image.open(paths[0]).convert("RGB").save(rgb)
        done = run_predict(tmp_path / "model" / model_file, rgb)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split(": ")[1].split()[0]) == expected[0]


def test_predict_decodes_a_folder_as_training_did_in_order_over_threads(trained, digits_data, tmp_path, monkeypatch):
    """A folder larger than a chunk, photos among digits, one unreadable file in the middle: each image is classified
    on the pixels training's decode gives it (a JPEG drafted, RGB made gray), in the order named, over threads, and
    the unreadable one is said without costing the others (predict read each file whole, one at a time: 23 img/s).
    The model runs on the caller's torch threads less the decoding threads (the decoding held it to one)."""
    import threading

    from cnnopt.data import decode
    from cnnopt.data.decode import CHUNK
    from cnnopt.predict import LoadedModel, predictions

    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    paths = write_digits(digits_data, tmp_path / "images", count=CHUNK + 10)
    rng = np.random.default_rng(0)
    for index in (3, CHUNK + 2):  # large RGB photos, drafted as training drafts them
        paths[index].unlink()
        paths[index] = paths[index].with_suffix(".jpg")
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(paths[index], quality=90)
    paths[CHUNK - 1].write_bytes(b"not an image")
    real_decode, decoders = decode._decode, set()

    def on_a_thread(*args, **kwargs):  # which threads decode (a little slow, so that the pool's two overlap)
        decoders.add(threading.get_ident())
        time.sleep(0.01)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode", on_a_thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the caller's: the model runs on those the 2 decoding threads leave, whatever
    try:  # the decoding holds torch to
        for model_file in ("model.pt", "model.pt2"):
            model, seen = LoadedModel(tmp_path / "model" / model_file), []
            module = model.module
            model.module = lambda images: seen.append(torch.get_num_threads()) or module(images)
            decoders.clear()
            results = list(predictions(model, paths, workers=2))
            assert len(decoders) == 2 and threading.get_ident() not in decoders, "decoded on two threads of a pool"
            assert seen and set(seen) == {2} and torch.get_num_threads() == 4
            check_predictions(results, paths, predictor)
            for _ in predictions(model, paths, workers=2):  # left after one image: the threads are given back
                break
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    done = run_predict(tmp_path / "model" / "model.pt", tmp_path / "images")
    assert done.returncode == 2 and f"1 of {CHUNK + 10} images could not be read" in done.stderr, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        str(path) for index, path in enumerate(sorted(paths)) if path != paths[CHUNK - 1]]


def check_predictions(results, paths, predictor):
    from cnnopt.data.decode import CHUNK, decode_image

    assert [path for path, _ in results] == paths
    for index, (path, result) in enumerate(results):
        if index == CHUNK - 1:
            assert isinstance(result, UsageError) and str(path) in str(result)
            continue
        decoded = torch.from_numpy(decode_image(path, 1, 8)).unsqueeze(0)
        assert torch.allclose(result, predictor(decoded)[0], atol=1e-6), path.name


def test_sixteen_bit_gray_images_are_scaled_not_clipped(tmp_path):
    from cnnopt.data.decode import decode_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0..63000
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = decode_image(tmp_path / "deep.png", 1, 8)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 8, 8)
    assert pixels.max() == 245 and pixels.min() == 0 and len(np.unique(pixels)) > 50


def test_a_dark_sixteen_bit_pgm_is_scaled_by_its_depth_as_a_png_is(tmp_path):
    """Pillow reads a PGM of more than 8 bits as mode I (scaled to 16 bits), whose depth was then guessed per
    image: values up to 250 were read as 8-bit (mean 124.5), up to 260 as 16-bit (mean 0.5)."""
    from cnnopt.data.decode import decode_image

    def pgm(name: str, top: int) -> Path:
        values = np.linspace(0, top, 64).astype(">u2").reshape(8, 8)
        (tmp_path / name).write_bytes(b"P5\n8 8\n65535\n" + values.tobytes())
        return tmp_path / name

    for path in (pgm("dark250.pgm", 250), pgm("dark260.pgm", 260)):
        assert decode_image(path, 1, 8).max() <= 1, path.name
    assert decode_image(pgm("bright.pgm", 65535), 1, 8).max() == 255


def test_predict_from_the_registry(trained, digits_data, mlflow_store, tmp_path):
    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    experiment = load_experiment(None, ["name=registry"])
    client = tracking.make_client()
    registry.register(experiment, tracking.start_run(client, experiment, "r"), tmp_path / "model", 0.9)
    paths = write_digits(digits_data, tmp_path / "images", count=2)
    done = run_predict("models:/registry@champion", *paths, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 2
    # The database kept, its artifact folder gone (moved, deleted): said so, not "promote a study".
    import shutil

    shutil.move("mlruns", "mlruns-away")
    done = run_predict("models:/registry@champion", *paths, env={"MLFLOW_TRACKING_URI": mlflow_store})
    shutil.rmtree("mlruns", ignore_errors=True)  # the store's check makes an empty one, where it writes artifacts
    shutil.move("mlruns-away", "mlruns")
    assert done.returncode == 2 and "its files are missing: the artifact folder" in done.stderr, done.stderr
    assert "restore the artifact folder" in done.stderr and "Traceback" not in done.stderr
    done = run_predict("models:/registry@nope", *paths, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "alias nope not found; check the name and alias (python -m cnnopt.promote registers" in done.stderr
    done = run_predict("models:/registry", *paths, env={"MLFLOW_TRACKING_URI": mlflow_store})  # MLflow: "Logged
    assert done.returncode == 2 and done.stderr.strip() == (  # model with ID 'registry' not found" (QA)
        "error: models:/registry names no version or alias of the registered model 'registry'; give "
        "models:/registry@champion (the alias python -m cnnopt.promote moves) or models:/registry/VERSION"), done.stderr
    import mlflow  # the registered pyfunc model serves the same probabilities as the Predictor

    mlflow.set_tracking_uri(mlflow_store)
    served = mlflow.pyfunc.load_model("models:/registry@champion").predict(digits_data.test_x[:4].numpy())
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(served), predictor(digits_data.test_x[:4]), atol=1e-5)


def test_predict_bad_inputs_are_one_clear_line(trained, digits_data, tmp_path):
    _, predictor = trained
    export(predictor, tmp_path / "model", digits_data.test_x[:16])
    image = write_digits(digits_data, tmp_path / "images", count=1)[0]
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a model at all")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as archive:  # a zip, no torch.export archive: torch.export
        archive.writestr("other/notes.txt", "hello")                 # printed an 18-line traceback before our line
    (tmp_path / "broken.png").write_bytes(b"PNG? no")
    cases = [((tmp_path / "corrupt.pt", image), "not a model.pt"),
             # A run's training checkpoint, the likeliest wrong file: said as such, with the file to pass.
             ((tmp_path / "state.pt", image), "state.pt is a torch.save file (a run's checkpoint/checkpoint.pt, say), "
                                              "not an exported model: pass the run's exported/model.pt"),
             ((tmp_path / "other.pt2", image), "other.pt2 is not a model cnnopt exported (RuntimeError: "),
             ((tmp_path / "model" / "model.pt", tmp_path / "broken.png"), "cannot read image"),
             ((tmp_path / "model" / "model.pt", tmp_path / "missing.png"), "not found"),
             ((tmp_path / "model" / "model.pt", image, "--top-k", "0"), "argument --top-k: 0 is not a number"),
             # The exported folder itself: it said "not found" of a folder that is there.
             ((tmp_path / "model", image), f"model {tmp_path / 'model'} is a folder, not a model file; pass "
                                           f"{tmp_path / 'model' / 'model.pt'}"),
             # A folder with no images beside an image: it was skipped without a word (alone, an error).
             ((tmp_path / "model" / "model.pt", image, tmp_path / "empty"), f"folder {tmp_path / 'empty'} holds no "
                                                                           "images (")]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        done = run_predict(*args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # One unreadable image among others: the others are predicted, then one line (it stopped the batch there).
    done = run_predict(tmp_path / "model" / "model.pt", tmp_path / "broken.png", image)
    assert done.returncode == 2 and done.stdout.startswith(f"{image}: "), done.stdout + done.stderr
    assert done.stderr.startswith("error: 1 of 2 images could not be read (the first: cannot read image") and \
        done.stderr.strip().endswith("the others are predicted above"), done.stderr
    started = time.monotonic()  # a server that does not answer: said in seconds, not after MLflow's retries
    done = run_predict("models:/digits@champion", image, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert done.returncode == 2 and "the MLflow tracking server http://127.0.0.1:9 does not answer" in done.stderr
    assert time.monotonic() - started < 30


def test_the_model_card_says_what_selected_the_model(mlflow_store):
    """The card said 'Selected on: val_accuracy (max) of the validation split' and 'validation val_accuracy: nan'
    for a train+val final (its last epoch kept, the val images trained on), and called a train_* metric a
    validation one."""
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.create_experiment("cards")
    checkpoint = {"preprocessing": {"image_size": 8, "channels": 1, "class_names": ["0", "1"]}, "epoch": 16}
    result = {"test_accuracy": 0.9, "test_loss": 0.3}

    def card(metric, tags, metrics):
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        settings = load_experiment(None, [f"metric={metric}"])
        return promote_module.model_card(settings, client.get_run(run_id), checkpoint, result).splitlines()

    selected = card("val_accuracy", {}, {"best_val_accuracy": 0.95})
    # A study's model: its configuration and seed trained alone (the card gave only the study's command, whose
    # choice varies), then the study.
    checkpoint["train_config"] = {**dataclasses.asdict(load_experiment(None).train), "lr": 0.0123, "seed": 77,
                                  "device": "cuda"}
    studied = card("val_accuracy", {"cnnopt.study": "s1", "final_data": "train+val"}, {"best_val_accuracy": 0.95})
    reproduce = studied[studied.index("## Reproduce") + 1:]
    assert reproduce[0] == ("This configuration and seed, trained again alone (this model trained on train+val; "
                            "cnnopt.train trains on the train split):")
    assert reproduce[1].startswith("python -m cnnopt.train --experiment ") and reproduce[1].endswith(
        " --set metric=val_accuracy --set train.lr=0.0123 --set train.seed=77"), reproduce[1]
    assert reproduce[4].startswith("python -m cnnopt.search --experiment ")
    # A time budget's trial: cnnopt.train is not given the study's [search] overrides (it reads none), and is
    # given the train subset the trial searched on (set by the plan, in no override).
    budgeted = dataclasses.replace(load_experiment(None, ["search.time_budget=1", "train.epochs=3"]),
                                   data=dataclasses.replace(load_experiment(None).data, subset=500))
    run_id = client.create_run(experiment_id, tags={"cnnopt.study": "s2"}).info.run_id
    alone = promote_module.model_card(budgeted, client.get_run(run_id), checkpoint, result).splitlines()
    alone = alone[alone.index("## Reproduce") + 2]
    assert alone.startswith("python -m cnnopt.train --experiment ") and "search." not in alone, alone
    assert " --set train.epochs=3 --set data.subset=500 " in alone, alone
    # The user's own data.subset, of which the plan searched a smaller one: the trial's (it was kept as asked).
    asked = load_experiment(None, ["data.subset=900", "search.time_budget=1"])
    smaller = dataclasses.replace(asked, data=dataclasses.replace(asked.data, subset=300))
    card_lines = promote_module.model_card(smaller, client.get_run(run_id), checkpoint, result).splitlines()
    alone = card_lines[card_lines.index("## Reproduce") + 2]
    assert " --set data.subset=300 " in alone and "subset=900" not in alone, alone
    study = promote_module.model_card(budgeted, client.get_run(run_id), checkpoint, result).splitlines()
    assert study[study.index("## Reproduce") + 5].endswith("--set search.time_budget=1 --set train.epochs=3")
    # Trained on the CPU (threads recorded) under train.device = auto: the command pins the CPU and its threads,
    # or a machine with a GPU would train it there (review).
    cpu = {**checkpoint, "train_config": {**checkpoint["train_config"], "device": "cpu"}, "threads": 3}
    run_id = client.create_run(experiment_id, tags={"cnnopt.study": "s3"}).info.run_id
    lines = promote_module.model_card(load_experiment(None), client.get_run(run_id), cpu, result).splitlines()
    assert lines[lines.index("## Reproduce") + 1].endswith(", on the CPU with the 3 threads it trained with:")
    pinned = lines[lines.index("## Reproduce") + 2]
    assert pinned.startswith("OMP_NUM_THREADS=3 python -m cnnopt.train ") and " --set train.device=cpu" in pinned
    checkpoint.pop("train_config")
    assert "Selected on: val_accuracy (max) of the validation split; best epoch 16" in selected
    assert "- validation val_accuracy: 0.9500" in selected and "- test accuracy: 0.9000 (test split used once, here)" in selected
    final = card("val_accuracy", {"kept_epoch": "last", "final_data": "train+val"}, {"best_train_loss": 0.1})
    assert "Selected on: nothing; trained on train+val, its last epoch (16) kept" in final
    assert not any("nan" in line or line.startswith("- validation") for line in final)
    # A study's final training: its epoch was not selected, its configuration was (the card said "nothing").
    final = card("val_accuracy", {"kept_epoch": "last", "final_data": "train+val", "cnnopt.study": "s1",
                                  "trains_trial": "12"}, {"best_train_loss": 0.1})
    assert ("Selected on: val_accuracy (max) of the validation split, by the study that chose trial 12's "
            "configuration; this model is that configuration's final training; trained on train+val, its last "
            "epoch (16) kept") in final, final
    on_train = card("train_loss", {}, {"best_train_loss": 0.25})
    assert "Selected on: train_loss (min) of the train split; best epoch 16" in on_train
    assert "- train train_loss: 0.2500" in on_train
    # A final on the train split keeps its last epoch and is scored on val there, not selected by it; where its
    # configuration was confirmed, the card gives the seeds' mean ± sd (the figure with less luck in it).
    parent = client.create_run(experiment_id).info.run_id
    for key, value in {"confirm_mean_trial_12": 0.9864, "confirm_std_trial_12": 0.0043, "confirm_seeds_trial_12": 3,
                       "confirm_mean_trial_24": 0.9864}.items():
        client.log_metric(parent, key, value)
    client.set_tag(parent, "confirmed_trial", "12")
    final = card("val_accuracy", {"kept_epoch": "last", "final_data": "train", "trains_trial": "12",
                                  "mlflow.parentRunId": parent}, {"best_val_accuracy": 0.9963})
    assert "Selected on: nothing; trained on train, its last epoch (16) kept, where its schedule ends" in final
    assert "- validation val_accuracy at that epoch: 0.9963" in final
    assert ("- confirmed: trial 12's configuration scored val_accuracy 0.9864 ± 0.0043 over 3 new seeds (mean ± "
            "standard deviation of their best epochs, at its trial's length: one run's best is luckier)") in final
    seed = card("val_accuracy", {"confirms_trial": "24", "mlflow.parentRunId": parent}, {"best_val_accuracy": 0.99})
    assert not any(line.startswith("- confirmed") for line in seed), "trial 24 was not the configuration chosen"
    # One seed: no spread shown as if measured; no completed seed (a NaN mean, as a fallback logged it): no line.
    client.log_metric(parent, "confirm_seeds_trial_12", 1, step=1)
    one = card("val_accuracy", {"trains_trial": "12", "mlflow.parentRunId": parent}, {"best_val_accuracy": 0.99})
    assert ("- confirmed: trial 12's configuration scored val_accuracy 0.9864 with 1 new seed (one seed: no spread "
            "measured)") in one
    client.log_metric(parent, "confirm_mean_trial_12", float("nan"), step=2)
    none = card("val_accuracy", {"trains_trial": "12", "mlflow.parentRunId": parent}, {"best_val_accuracy": 0.99})
    assert not any(line.startswith("- confirmed") or "nan" in line for line in none)


def test_a_run_no_better_than_the_commonest_class_is_not_tested_or_registered(mlflow_store, tmp_path, monkeypatch):
    """Under load a budgeted study finished 1 trial, at digits' val accuracy 0.1041 (the commonest class's share),
    and registered it as champion, exit 0. Its recorded score is set to that share here (a net trained to chance
    on purpose would be a flaky one)."""
    import torch as torch_

    from cnnopt import train as train_cli
    from cnnopt.data.datasets import load_data
    from cnnopt.experiment.config import load_experiment as load

    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--set", "train.epochs=1", "--set", "train.device=cpu"]) == 0
    client = MlflowClient(tracking_uri=mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    data = load_data(load(None).data)
    commonest = float(torch_.bincount(data.val_y.long()).max()) / len(data.val_y)
    client.log_metric(run.info.run_id, "best_val_accuracy", commonest, step=10 ** 6)
    with pytest.raises(UsageError, match=rf"val_accuracy {commonest:.4f} is no better than always answering the "
                                         r"commonest class .*: it learnt nothing worth registering"):
        promote_cli.main(["--run-id", run.info.run_id])
    assert not client.search_model_versions("name='digits'")
    assert "test_accuracy" not in client.get_run(run.info.run_id).data.metrics, "its test split is left unread"
