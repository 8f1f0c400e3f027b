"""``synthbrain plot-run``: a training run's curves as a PNG, from the trainers' own CSV logs."""

import numpy as np
import pytest
from PIL import Image

from synth.cli import main
from synth.train.common import LossLog
from synth.train.curves import moving_average, plot_run, read_curves


def _run(tmp_path, steps=30, gap_every=None):
    run = tmp_path / "run"
    log = LossLog(run / "losses.csv", ["loss", "lr"])
    for s in range(1, steps + 1):
        log.log(s, loss=1.0 / s, lr=1e-4)
    log.close()
    if gap_every:
        gap = LossLog(run / "gap.csv", ["train_t50", "heldout_t50", "ratio_t50"])
        for s in range(gap_every, steps + 1, gap_every):
            gap.log(s, train_t50=0.1, heldout_t50=0.1 + s / 1000, ratio_t50=1 + s / 100)
        gap.close()
    return run


def test_read_curves_keeps_numbers_by_column_and_leaves_out_blank_cells(tmp_path):
    run = _run(tmp_path, steps=4)
    (run / "losses.csv").write_text((run / "losses.csv").read_text() + "5,0.1,,2e-4\n")  # a blank cell, as after a migration
    curves = read_curves(run / "losses.csv")
    assert set(curves) == {"loss", "lr"}
    assert curves["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3, rel=1e-5)), (4, 0.25)]
    assert curves["lr"][-1] == (5, 2e-4)
    (run / "empty.csv").write_text("")  # a log whose header is not flushed yet
    assert read_curves(run / "empty.csv") == {}
    (run / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a training log"):
        read_curves(run / "other.csv")


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([2, 4], 10) == [2, 3]
    assert np.allclose(moving_average(list(range(100)), 100)[-1], 49.5)


def test_plot_run_draws_the_gap_panel_only_when_there_is_one(tmp_path):
    plain = plot_run(_run(tmp_path / "a"))
    with_gap = plot_run(_run(tmp_path / "b", gap_every=10), tmp_path / "b.png")
    assert plain == tmp_path / "a" / "run" / "curves.png" and with_gap.is_file()
    with Image.open(plain) as a, Image.open(with_gap) as b:
        (wa, ha), (wb, hb) = a.size, b.size
    assert ha == hb and wb == pytest.approx(1.5 * wa, rel=0.02)  # loss and lr: two panels; with the gap: three
    (tmp_path / "c" / "run").mkdir(parents=True)
    (tmp_path / "c" / "run" / "losses.csv").write_text("step,time_s,loss\n")
    with pytest.raises(ValueError, match="no logged values yet"):
        plot_run(tmp_path / "c" / "run")
    with pytest.raises(ValueError, match="smooth must be at least 1 step, got 0"):
        plot_run(tmp_path / "a" / "run", tmp_path / "zero.png", smooth=0)
    assert not (tmp_path / "zero.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["RUN", "--out", "curves.jpg"], "--out expects a .png path, got curves.jpg"),
    (["RUN", "--smooth", "0"], "argument --smooth: expected a positive integer, got '0'"),
    (["NOWHERE"], "holds no losses.csv (expected a training run folder)"),
])
def test_plot_run_cli_refuses_bad_input_with_exit_2(tmp_path, capsys, argv, message):
    run = _run(tmp_path)
    argv = [str(run) if a == "RUN" else str(tmp_path / a) if a == "NOWHERE" else a for a in argv]
    assert main(["plot-run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (run / "curves.png").exists()


def test_plot_run_cli_writes_the_png(tmp_path, capsys):
    run = _run(tmp_path, gap_every=10)
    assert main(["plot-run", str(run), "--smooth", "5"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'curves.png'}"
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG"
