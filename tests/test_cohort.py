"""``synthbrain cohort``: a BIDS derivative data set that PyBIDS reads, reproducible from its spec,
resumable after SIGKILL, and sharded by torchrun ranks (CPU, gloo), on the tiny test model."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.cli import main
from synth.cohort import CohortSpec, plan

from .test_distributed import TORCHRUN, needs_torchrun

N = 20
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the suite's processes share two cores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny test model on a 16^3 grid (a cohort of 20 takes seconds)."""
    from synth.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-test-model", shape=(16, 16, 16))


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory, model_dir):
    """A tiny segmenter on the tiny model's grid (a few training steps: its labels need only exist)."""
    from synth.anatomy.testing import make_tiny_segmenter
    from synth.grid import Grid
    from synth.models.config import ModelConfig

    g = ModelConfig.load(model_dir).grid
    grid = Grid(tuple(g["shape"]), float(g["spacing"]), tuple(g["origin"]))
    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", grid, steps=5)


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flags(model, seg, out, n=N):
    return ["cohort", "--n", str(n), "--age", "40:80", "--sex-ratio", "0.5", "--diagnosis", "CN:0.6,MCI:0.2,AD:0.2",
            "--model", str(model), "--segmenter", str(seg), "--seed", "7", "--device", "cpu", "--workers", "1", "--quiet",
            "--out", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, seg_dir):
    """An uninterrupted 20-subject cohort made in this process (one torch thread)."""
    import torch

    out = tmp_path_factory.mktemp("cohort") / "ref"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(flags(model_dir, seg_dir, out)) == 0
    finally:
        torch.set_num_threads(n)
    return out


def checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every image and of the tables (sidecars hold creation times, so they are left out)."""
    files = sorted(root.glob("sub-*/anat/*.nii.gz")) + [root / n for n in ("participants.tsv", "participants.json",
                                                                              "dseg.tsv", "dataset_description.json")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_plan_follows_the_spec_exactly():
    spec = CohortSpec(n=N, age=(40, 80), diagnosis="CN:0.6,MCI:0.2,AD:0.2", seed=7)
    subjects = plan(spec)
    assert [s.participant_id for s in subjects] == [f"sub-{i:04d}" for i in range(1, N + 1)]
    dx = [s.condition.diagnosis for s in subjects]
    assert (dx.count("CN"), dx.count("MCI"), dx.count("AD")) == (12, 4, 4)
    assert sum(s.condition.sex == "F" for s in subjects) == 10
    assert all(40 <= s.condition.age <= 80 for s in subjects)
    assert len({s.seed for s in subjects}) == N
    assert plan(CohortSpec(n=N, age=(40, 80), diagnosis={"CN": 0.6, "MCI": 0.2, "AD": 0.2}, seed=7)) == subjects
    other = plan(CohortSpec(n=N, age=(40, 80), diagnosis="CN:0.6,MCI:0.2,AD:0.2", seed=8))
    assert [s.seed for s in other] != [s.seed for s in subjects]


def test_cohort_is_a_complete_bids_derivative(reference):
    from bids import BIDSLayout

    root = reference
    subs = sorted(p.name for p in root.glob("sub-*"))
    assert subs == [f"sub-{i:04d}" for i in range(1, N + 1)]
    for s in subs:
        names = sorted(p.name for p in (root / s / "anat").iterdir())
        assert names == sorted(f"{s}_{x}" for x in ("T1w.nii.gz", "T1w.json", "dseg.nii.gz", "dseg.json"))
    assert not (root / ".partial").exists()

    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    names = [g["Name"] for g in desc["GeneratedBy"]]
    assert names[:2] == ["SynthBrain", "tiny-test-model"] and desc["GeneratedBy"][1]["Version"] == "0.0.0-test"
    assert all("NOT FOR CLINICAL USE" in g["Description"] for g in desc["GeneratedBy"])
    assert "NOT FOR CLINICAL USE" in desc["Name"] and "NOT FOR CLINICAL USE" in (root / "README").read_text()

    side = json.loads((root / "sub-0003" / "anat" / "sub-0003_T1w.json").read_text())
    sub3 = plan(CohortSpec.from_dict(json.loads((root / "code" / "cohort_spec.json").read_text())))[2]
    assert side["synthetic"] is True and "NOT FOR CLINICAL USE" in side["notice"]
    assert side["model"] == "tiny-test-model" and side["seed"] == sub3.seed
    assert side["condition"]["age"] == sub3.condition.age and side["cohort"]["participant_id"] == "sub-0003"
    seg_side = json.loads((root / "sub-0003" / "anat" / "sub-0003_dseg.json").read_text())
    assert seg_side["model"] == "tiny-test-model" and seg_side["segmenter"] == "tiny-test-segmenter"
    assert seg_side["volumes_mm3"]["icv"] > 0

    # participants.tsv: one row per subject; participants.json describes every column.
    lines = (root / "participants.tsv").read_text().strip().split("\n")
    header = lines[0].split("\t")
    assert len(lines) == N + 1 and header[:5] == ["participant_id", "age", "sex", "diagnosis", "seed"]
    assert {"requested_hippocampus", "hippocampus_mm3", "measured_hippocampus", "icv_mm3"} <= set(header)
    assert set(json.loads((root / "participants.json").read_text())) == set(header)
    row3 = dict(zip(header, lines[3].split("\t")))
    assert float(row3["icv_mm3"]) == seg_side["volumes_mm3"]["icv"] and row3["diagnosis"] == sub3.condition.diagnosis
    dseg = (root / "dseg.tsv").read_text().strip().split("\n")
    assert dseg[0].split("\t") == ["index", "name", "color"] and len(dseg) == 31

    layout = BIDSLayout(root, validate=True, is_derivative=True)  # PyBIDS accepts the derivative layout as is
    assert len(layout.get_subjects()) == N
    t1 = layout.get(subject="0003", suffix="T1w", extension=".nii.gz")
    assert len(t1) == 1 and layout.get_metadata(t1[0].path)["seed"] == sub3.seed
    assert len(layout.get(suffix="dseg", extension=".nii.gz")) == N
    assert layout.get_dataset_description()["DatasetType"] == "derivative"
    assert layout.get(suffix="participants", extension=".tsv")[0].get_df().shape[0] == N


def test_resumes_after_sigkill_to_the_same_files(reference, tmp_path, one_thread):
    """Killed half way (two worker processes, --workers auto, die with it), then run again from the
    saved spec in one process: the same files as the uninterrupted run."""
    spec = reference / "code" / "cohort_spec.json"
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "synth.cli", "cohort", "--spec", str(spec), "--out", str(out), "--device", "cpu",
           "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("sub-*"))) < N // 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = len(list(out.glob("sub-*")))
    assert N // 2 <= done < N
    time.sleep(1.0)
    assert len(list(out.glob("sub-*"))) == done  # no worker outlived the killed command
    for sub in out.glob("sub-*"):  # whatever was killed, no subject is half there
        assert len(list((sub / "anat").iterdir())) == 4
    assert not (out / "participants.tsv").exists()  # the tables come at the end

    assert main(["cohort", "--spec", str(spec), "--out", str(out), "--device", "cpu", "--workers", "1", "--quiet"]) == 0
    assert checksums(out) == checksums(reference)
    assert not (out / ".partial").exists()


@needs_torchrun
def test_torchrun_two_ranks_share_the_cohort(reference, tmp_path):
    """Two gloo processes: each makes its own half; rank 0 writes the tables; same files as one process."""
    out = tmp_path / "ranks"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "synth.cli", "cohort",
           "--spec", str(reference / "code" / "cohort_spec.json"), "--out", str(out), "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(out) == checksums(reference)
    made = [json.loads(p.read_text())["cohort"] for p in sorted(out.glob("sub-*/anat/*_T1w.json"))]
    assert [m["world_size"] for m in made] == [2] * N
    assert sorted(m["rank"] for m in made) == [0] * (N // 2) + [1] * (N // 2)  # round-robin shards
    assert res.stdout.count("subjects complete") == 1  # only rank 0 reports


def test_yaml_spec_flags_override_and_another_spec_is_refused(tmp_path, model_dir, seg_dir, one_thread, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"n: 2\nage: 50:60\nsex-ratio: 1.0\ndiagnosis: AD\nmodel: {model_dir}\nsegmenter: {seg_dir}\nseed: 3\n")
    out = tmp_path / "c"
    assert main(["cohort", "--spec", str(spec), "--steps", "2", "--out", str(out), "--device", "cpu", "--workers", "1",
                 "--quiet"]) == 0
    saved = json.loads((out / "code" / "cohort_spec.json").read_text())
    assert saved["n"] == 2 and saved["age"] == [50.0, 60.0] and saved["steps"] == 2 and saved["diagnosis"] == {"AD": 1.0}
    rows = (out / "participants.tsv").read_text().strip().split("\n")[1:]
    assert [r.split("\t")[2:4] for r in rows] == [["F", "AD"], ["F", "AD"]]
    assert json.loads((out / "sub-0001" / "anat" / "sub-0001_T1w.json").read_text())["steps"] == 2
    # The same folder, another spec: refused, nothing touched.
    before = checksums(out)
    assert main(["cohort", "--spec", str(spec), "--out", str(out), "--device", "cpu", "--workers", "1", "--quiet"]) == 2
    assert "another spec (differs in steps)" in capsys.readouterr().err
    assert checksums(out) == before


def test_match_volumes_warps_every_subject_and_keeps_old_digests(tmp_path, model_dir, seg_dir, one_thread):
    from synth.cohort import CohortSpec

    # Off (the default) is not in the canonical spec: cohorts made before the option keep their digest.
    assert "match_volumes" not in CohortSpec(n=2).to_dict()
    assert CohortSpec(n=2).digest() != CohortSpec(n=2, match_volumes=True).digest()
    with pytest.raises(ValueError, match="`match_volumes` must be true or false"):
        CohortSpec(n=2, match_volumes="yes")
    out = tmp_path / "m"
    assert main(["cohort", "--n", "2", "--model", str(model_dir), "--segmenter", str(seg_dir), "--steps", "2",
                 "--match-volumes", "--out", str(out), "--device", "cpu", "--workers", "1", "--quiet"]) == 0
    assert json.loads((out / "code" / "cohort_spec.json").read_text())["match_volumes"] is True
    for sub in ("sub-0001", "sub-0002"):
        meta = json.loads((out / sub / "anat" / f"{sub}_T1w.json").read_text())
        assert meta["volume_matching"]["segmenter"] and meta["history"][-1]["command"] == "match_volumes"
        # one fixed thread per worker: the generator did not re-pick its count from the machine's load
        assert meta["threads"] == 1 and "threads_adapted" not in meta


def test_a_failed_subject_leaves_nothing_half_written(tmp_path, model_dir, seg_dir, one_thread, monkeypatch, capsys):
    import synth.anatomy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth.anatomy, "save_labels", full_disk)  # fails after the T1w is written
    out = tmp_path / "c"
    assert main(flags(model_dir, seg_dir, out, n=2)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list(out.glob("sub-*")) and not list((out / ".partial").glob("*"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--n": "0"}, "`n` must be an integer within 1-"),
        ({"--n": "ten"}, "`n` must be an integer"),
        ({"--age": "90:40"}, "`age` must be LO:HI years"),
        ({"--age": "10:50"}, "`age` must be LO:HI years within 18-95"),
        ({"--sex-ratio": "1.5"}, "`sex_ratio` must be a number within 0-1"),
        ({"--diagnosis": "CN:0.5,AD:0.2"}, "summing to 1"),
        ({"--diagnosis": "CN:0.5,PD:0.5"}, "`diagnosis` must be a mix"),
        ({"--seed": "-1"}, "`seed` must be an integer"),
        ({"--workers": "0"}, "`workers` must be an integer within 1-256"),
        ({"--device": "gpu"}, "--device must be auto, cpu"),
        ({"--model": "no-such-model"}, "no model named or found at 'no-such-model'"),
    ],
)
def test_bad_flags_are_one_line_errors_and_write_nothing(tmp_path, model_dir, seg_dir, capsys, change, message):
    argv = flags(model_dir, seg_dir, tmp_path / "c")
    for key, value in change.items():
        if key in argv:
            argv[argv.index(key) + 1] = value
        else:
            argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("n: 3\ncolour: red\n", ".yaml", "unknown cohort spec keys ['colour']"),
        ("age: 40:50\n", ".yaml", "give --n"),
        ("[1, 2]", ".json", "must hold a mapping"),
        ("{n: 3", ".json", "could not read the spec"),
        ("n = 3", ".toml", "unknown spec format '.toml'"),
    ],
)
def test_bad_spec_files_are_one_line_errors(tmp_path, capsys, text, suffix, message):
    spec = tmp_path / f"spec{suffix}"
    spec.write_text(text)
    assert main(["cohort", "--spec", str(spec), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_a_foreign_folder_is_refused(tmp_path, model_dir, seg_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own files")
    assert main(flags(model_dir, seg_dir, out)) == 2
    assert "holds no code/cohort_spec.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_two_cpu_workers_make_the_same_files(reference, tmp_path, one_thread):
    out = tmp_path / "workers"
    spec = reference / "code" / "cohort_spec.json"
    assert main(["cohort", "--spec", str(spec), "--out", str(out), "--device", "cpu", "--workers", "2", "--quiet"]) == 0
    assert checksums(out) == checksums(reference)
    made = [json.loads(p.read_text())["cohort"] for p in sorted(out.glob("sub-*/anat/*_T1w.json"))]
    assert sorted(m["worker"] for m in made) == [0] * (N // 2) + [1] * (N // 2)


def test_bad_flags_fail_before_torch_is_imported(tmp_path):
    code = ("import sys; from synth.cli import main; "
            f"rc = main(['cohort', '--n', '5', '--diagnosis', 'CN:0.9', '--out', {str(tmp_path / 'c')!r}]); "
            "print(rc, 'torch' in sys.modules, 'monai' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.stdout.split() == ["2", "False", "False"], res.stderr
    assert "summing to 1" in res.stderr and not (tmp_path / "c").exists()
