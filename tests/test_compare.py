"""``synthbrain compare-reports``: evaluation reports side by side against the realism targets.

Read from the reports committed under docs/evaluation (real ``synthbrain evaluate`` output), and from edited
copies of one where a figure has to sit on a target's edge.
"""

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from synth.cli import main
from synth.compare import load_report, markdown_table, verdicts

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation"
DEFAULT = DOCS / "synthbrain-ldm-2mm"
FAST = DOCS / "synthbrain-ldm-2mm-fast-refined"


def _row(table: str, label: str) -> list[str]:
    line = next(s for s in table.splitlines() if s.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_reads_each_report_and_marks_the_targets():
    a, b = load_report(DEFAULT), load_report(FAST / "report.json")  # a folder or the file itself
    table = markdown_table([a, b], ["default", "fast"])
    assert "NOT FOR CLINICAL USE" in table.splitlines()[0]
    cnn = _row(table, "classifier two-sample accuracy, 3D CNN")
    assert cnn[2] == f"{100 * a['c2st']['cnn']['accuracy']:.1f} % ({100 * a['c2st']['cnn']['ci95'][0]:.1f}-" \
                     f"{100 * a['c2st']['cnn']['ci95'][1]:.1f} %) (**not met**)"
    fid = _row(table, "FID on the feature network")
    assert fid[2].startswith(f"{a['distances']['samples']['fid']:.2f} / {a['distances']['yardstick']['fid']:.2f}")
    assert fid[2].endswith("(met)") == (a["distances"]["fid_ratio"] <= 2)
    # the fast report was made without the first-stage ceiling: a dash, not a number, and not judged
    assert _row(table, "first stage in the brain")[3] == "-"
    assert verdicts(b)["first stage in the brain: PSNR / SSIM"] is None
    met = [sum(v is True for v in verdicts(r).values()) for r in (a, b)]
    judged = [sum(v is not None for v in verdicts(r).values()) for r in (a, b)]
    assert _row(table, "targets met")[2:] == [f"{met[0]} of {judged[0]}", f"{met[1]} of {judged[1]}"]
    assert judged[0] == judged[1] + 1


@pytest.mark.parametrize("path, value, label, met", [
    (("c2st", "cnn", "accuracy"), 0.70, "classifier two-sample accuracy, 3D CNN", True),
    (("c2st", "cnn", "accuracy"), 0.7001, "classifier two-sample accuracy, 3D CNN", False),
    (("volumes", "samples", "lateral_ventricles", "median_bias"), -0.10, "lateral ventricles: median signed error (r)", True),
    (("volumes", "samples", "lateral_ventricles", "median_bias"), 0.11, "lateral ventricles: median signed error (r)", False),
    (("volumes", "samples", "hippocampus", "pearson_r"), 0.8, "hippocampus: r", True),
    (("diversity", "difference"), -0.06, "diversity: MS-SSIM within a condition - real", False),
    (("brain_age", "samples", "r"), 0.81, "brain age of samples: r / mean error", True),
    (("privacy", "pass"), False, "privacy rule (samples above every new person)", False),
])
def test_each_target_is_judged_at_its_edge(path, value, label, met):
    r = copy.deepcopy(load_report(DEFAULT))
    node = r
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    assert verdicts(r)[label] is met
    assert _row(markdown_table([r], ["x"]), label)[2].endswith("(met)" if met else "(**not met**)")


def test_kid_against_a_yardstick_at_or_below_zero_asks_for_zero_within_two_standard_errors():
    r = copy.deepcopy(load_report(DEFAULT))
    label = "KID (mean ± s.e.; yardstick)"
    r["distances"]["yardstick"]["kid"] = -0.05
    r["distances"]["samples"]["kid"].update(mean=0.15, sem=0.08)
    assert verdicts(r)[label] is True  # 0.15 - 0.16 <= 0
    r["distances"]["samples"]["kid"].update(mean=0.17)
    assert verdicts(r)[label] is False
    r["distances"]["yardstick"]["kid"] = 0.1  # a positive yardstick: at most twice it
    assert verdicts(r)[label] is True
    r["distances"]["samples"]["kid"].update(mean=0.21)
    assert verdicts(r)[label] is False


def test_cli_writes_table_and_plot_and_refuses_to_overwrite(tmp_path, capsys):
    out, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert main(["compare-reports", str(DEFAULT), str(FAST), "--names", "default", "fast",
                 "--out", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    assert table in printed and "| measure | target | default | fast |" in table
    assert f"`{DEFAULT}`" in table  # where each column came from
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 400
    before = png.read_bytes()
    assert main(["compare-reports", str(DEFAULT), "--plot", str(png)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert png.read_bytes() == before
    assert main(["compare-reports", str(DEFAULT), "--plot", str(png), "--force"]) == 0
    assert png.read_bytes() != before


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nothing"], "expected a report.json written by `synthbrain evaluate`"),
    (["{tmp}/notjson/report.json"], "is not JSON"),
    (["{tmp}/other.json"], "is not a `synthbrain evaluate` report"),
    (["{default}", "--names", "a", "b"], "--names expects one name a report (1), got 2"),
    (["{default}", "--out", "{tmp}/table.txt"], "--out expects a .md path"),
    (["{default}", "--plot", "{tmp}/p.jpg"], "--plot expects a .png path"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "report.json").write_text("{ not json")
    (tmp_path / "other.json").write_text(json.dumps({"model": "x"}))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["compare-reports", *[a.format(tmp=tmp_path, default=DEFAULT) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_volume_matched_brains_are_flagged_as_measuring_the_warp():
    matched = load_report(DOCS / "synthbrain-ldm-2mm-matched")
    assert matched["generator"]["volume_matching"]
    table = markdown_table([load_report(DEFAULT), matched], ["default", "matched"])
    hip = _row(table, "hippocampus: r")
    assert "(*)" not in hip[2] and "(*)" in hip[3]
    assert "(*)" not in _row(table, "FID on the feature network")[3]  # only the segmenter's figures
    assert "the warp's precision, not the model's" in table
    assert "(*) brains warped" not in markdown_table([load_report(DEFAULT)], ["default"])


def test_a_figure_missing_some_of_its_parts_reads_incomplete_and_is_still_judged():
    r = copy.deepcopy(load_report(DEFAULT))
    del r["c2st"]["cnn"]["ci95"]  # as in a report older than the confidence interval
    cell = _row(markdown_table([r], ["old"]), "classifier two-sample accuracy, 3D CNN")[2]
    assert cell == "(incomplete) (**not met**)"


def test_generation_seconds_say_when_a_cache_may_have_supplied_the_brains():
    r = copy.deepcopy(load_report(DEFAULT))
    r["options"]["cache_dir"] = "/some/cache"
    assert _row(markdown_table([r], ["x"]), "generation, seconds a brain")[2].endswith("(--cache: some may be loaded, not made)")
    r["options"]["cache_dir"] = None
    assert _row(markdown_table([r], ["x"]), "generation, seconds a brain")[2] == \
        f"{r['seconds']['generation'] / r['distances']['n_samples']:.1f} s"
