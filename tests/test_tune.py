"""``synthbrain tune``: an Optuna study of tiny diffusion training runs, scored on validation phantoms,
pruned, stored in SQLite and resumed."""

import csv
import json

import pytest

pytest.importorskip("optuna")

from synth.cli import main  # noqa: E402
from synth.tune import SearchSpace, TuneConfig, run_study, scale_unet  # noqa: E402

from .conftest import write_prepared  # noqa: E402
from .test_train import TINY_AE, TINY_UNET  # noqa: E402

SPACE = SearchSpace(lr=(1e-4, 1e-2), widths=(8, 16), latent_scale=(0.5, 1.5), guidance=(1.0, 3.0), steps=(2, 3))


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    """Phantom data (8 train, 2 val subjects, 16^3) and a 2-step tiny autoencoder run."""
    import torch

    from synth.train.autoencoder import AETrainConfig, train_autoencoder

    root = tmp_path_factory.mktemp("tune")
    data = write_prepared(root / "prep", ages=(22, 28, 34, 40, 46, 52, 58, 64, 70, 76), size=16, split="train")
    table = data.root / "subjects.csv"
    with open(table) as f:
        rows = list(csv.DictReader(f))
    for r in rows[-2:]:
        r["split"] = "val"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_autoencoder(AETrainConfig(data_dir=str(data.root), run_dir=str(root / "ae"), steps=2, bf16=False,
                                        autoencoder=dict(TINY_AE)), progress=False)
    finally:
        torch.set_num_threads(n)
    return data.root, root / "ae"


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_study_runs_reports_each_stage_and_resumes(study_inputs, tmp_path, one_thread):
    import optuna

    data, ae = study_inputs
    cfg = TuneConfig(data_dir=str(data), ae_run=str(ae), study_dir=str(tmp_path / "study"), trials=2, train_steps=4,
                     rungs=2, batch_size=2, bf16=False, unet=dict(TINY_UNET), space=SPACE, pruner_startup=5)
    lines = []
    study = run_study(cfg, device="cpu", log=lines.append)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        assert sorted(t.intermediate_values) == [2, 4]  # one score per stage, at its training step
        assert set(t.params) == {"lr", "width", "latent_scale", "guidance", "steps"}
        assert t.value == t.intermediate_values[4] and t.value > 0
        run = tmp_path / "study" / t.user_attrs["run_dir"]
        import torch

        state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
        assert state["step"] == 4 and state["config"]["lr"] == pytest.approx(t.params["lr"])
        assert state["model_config"]["unet"]["channels"] == [t.params["width"]] * 2
        assert state["config"]["latent_scale_factor"] == pytest.approx(t.params["latent_scale"])
    assert len(lines) == 4 and (tmp_path / "study" / "study.db").is_file()
    best = json.loads((tmp_path / "study" / "best.json").read_text())
    assert best["best_value"] == min(t.value for t in trials) and best["trials"]["complete"] == 2
    card = (tmp_path / "study" / "tuning.md").read_text()
    assert "## Hyper-parameter tuning" in card and f"| DDIM sampling steps | {best['best_params']['steps']} |" in card

    # Resumed from the same SQLite study (load_if_exists): only the missing trial runs.
    cfg.trials = 3
    study = run_study(cfg, device="cpu", log=lines.append)
    assert len(study.get_trials()) == 3 and len(lines) == 6
    assert [t.params for t in study.get_trials()[:2]] == [t.params for t in trials]


def test_poor_trials_are_pruned_after_their_first_stage(study_inputs, tmp_path, one_thread):
    import optuna

    data, ae = study_inputs
    cfg = TuneConfig(data_dir=str(data), ae_run=str(ae), study_dir=str(tmp_path / "study"), trials=1, train_steps=4,
                     rungs=2, batch_size=2, bf16=False, unet=dict(TINY_UNET), space=SPACE)
    # Every real score is above 0, so this pruner stops each trial at its first report.
    study = run_study(cfg, device="cpu", pruner=optuna.pruners.ThresholdPruner(upper=0.0), log=lambda s: None)
    (t,) = study.get_trials()
    assert t.state == optuna.trial.TrialState.PRUNED and list(t.intermediate_values) == [2]
    assert not (tmp_path / "study" / "best.json").exists()  # nothing completed, nothing chosen


def test_tune_command_line(study_inputs, tmp_path, one_thread, capsys):
    data, ae = study_inputs
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(TINY_UNET))
    argv = ["tune", "--data", str(data), "--ae-run", str(ae), "--study-dir", str(tmp_path / "s"), "--trials", "1",
            "--train-steps", "2", "--rungs", "1", "--batch-size", "2", "--widths", "8", "--sampling-steps", "2",
            "--unet", str(unet), "--device", "cpu", "--no-bf16", "--storage", f"sqlite:///{tmp_path / 'other.db'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best trial 0" in out and "synthbrain package" in out and "--sampling-steps 2" in out
    assert (tmp_path / "other.db").is_file() and not (tmp_path / "s" / "study.db").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trials", "0"], "`trials` must be an integer >= 1"),
        (["--rungs", "9", "--train-steps", "4"], "`rungs` (9) cannot exceed `train_steps` (4)"),
        (["--lr", "1e-2", "1e-4"], "`lr` must be a range"),
        (["--widths", "12"], "width 12 gives UNet channels [12, 12]"),
        (["--storage", "not a url"], "--storage must be an SQLAlchemy URL"),
        (["--score", "nomodule"], "--score must be tissue-contrast or module:function"),
    ],
)
def test_bad_tune_flags_are_one_line_errors(study_inputs, tmp_path, capsys, extra, message):
    data, ae = study_inputs
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(TINY_UNET))
    argv = ["tune", "--data", str(data), "--ae-run", str(ae), "--study-dir", str(tmp_path / "s"), "--unet", str(unet), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_missing_autoencoder_run_is_refused(tmp_path, capsys):
    assert main(["tune", "--data", str(tmp_path), "--ae-run", str(tmp_path / "nope"), "--study-dir", str(tmp_path / "s")]) == 2
    assert "no prepared data" in capsys.readouterr().err


def test_scale_unet_keeps_the_ratios():
    assert scale_unet({"channels": [32, 64, 128], "norm_num_groups": 16, "num_head_channels": [0, 32, 32],
                       "attention_levels": [False, True, True]}, 64)["channels"] == [64, 128, 256]
