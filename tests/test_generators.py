"""One generator interface, two backends: loading dispatches on the model's config."""

import ast
from pathlib import Path

import numpy as np
import pytest

import synth
from synth.cli import main
from synth.generators import BACKENDS, Generator, ModelInfo, available_models, backend_class, load_generator, model_backend
from synth.vq.testing import make_tiny_vq_model

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"generator", "synth_version", "backend", "model", "model_version", "model_source", "sampler",
          "guidance_scale", "precision", "device", "space", "intensity", "created", "background", "notice", "history"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("gen-models")
    (root / "tiny-test-model").symlink_to(tiny_model_dir, target_is_directory=True)
    make_tiny_vq_model(root / "tiny-vq-model", shape=(32, 32, 32))
    seg = root / "a-segmenter"
    seg.mkdir()
    (seg / "config.json").write_text('{"labels": [1, 2]}')
    return root


def test_the_models_list_says_which_backend(models, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    assert available_models() == ["tiny-test-model", "tiny-vq-model"]
    assert synth.available_models() == ["tiny-test-model", "tiny-vq-model"]
    info = available_models(details=True)
    assert [(m.name, m.backend, m.version) for m in info] == [("tiny-test-model", "ldm", "0.0.0-test"),
                                                              ("tiny-vq-model", "vq", "0.0.0-test")]
    assert all(isinstance(m, ModelInfo) and m.path.is_dir() for m in info)
    assert model_backend(models / "a-segmenter") is None


@pytest.mark.parametrize("name,backend", [("tiny-test-model", "ldm"), ("tiny-vq-model", "vq")])
def test_both_backends_load_by_name_and_generate_the_same_way(models, monkeypatch, name, backend):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    gen = synth.load_generator(name, device="cpu")
    assert isinstance(gen, Generator) and gen.backend == backend and isinstance(gen, backend_class(backend))
    cond = synth.Condition(age=70, sex="F", diagnosis="AD")
    a, b, c = gen.generate(cond, seed=2), gen.generate(cond, seed=2), gen.generate(cond, seed=3)
    assert isinstance(a, synth.SyntheticBrain) and a.image.shape == (32, 32, 32) and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert COMMON <= set(a.provenance) and a.provenance["backend"] == backend
    assert a.targets == gen.targets(cond) and gen.encode_condition(cond).shape == (1, 6)
    with pytest.raises(ValueError, match="seed"):
        gen.generate(cond, seed=-1)
    with pytest.raises(TypeError, match="Condition"):
        gen.generate({"age": 70}, seed=0)
    with pytest.raises(ValueError, match="no fast sampling preset"):  # tiny models have none: refused, never ignored
        gen.generate(cond, seed=2, fast=True)


def test_load_from_a_folder_and_unknown_names(models, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    assert load_generator(models / "tiny-vq-model", device="cpu").backend == "vq"
    with pytest.raises(FileNotFoundError, match="shipped models: tiny-test-model, tiny-vq-model"):
        load_generator("nope")
    with pytest.raises(ValueError, match="holds no generator"):
        load_generator(models / "a-segmenter")
    with pytest.raises(ValueError, match="unknown generator backend"):
        backend_class("gan")


def test_cli_generate_and_models_with_either_backend(models, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-test-model" in out and "ldm" in out and "tiny-vq-model" in out and "vq" in out
    for name in ("tiny-test-model", "tiny-vq-model"):
        path = tmp_path / f"{name}.nii.gz"
        assert main(["generate", "--age", "60", "--sex", "M", "--model", name, "--out", str(path), "--quiet",
                     "--device", "cpu"]) == 0
        assert path.is_file()
    assert "engine" in capsys.readouterr().out  # the VQ backend says which transformer engine ran


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_pipeline_and_zoo_do_not_import_each_other():
    pipeline, zoo = _imports(ROOT / "synth" / "pipeline.py"), _imports(ROOT / "synth" / "models" / "zoo.py")
    assert not any("zoo" in m for m in pipeline), pipeline
    assert not any("pipeline" in m for m in zoo), zoo
    assert set(BACKENDS) == {"ldm", "vq"}


def test_reconstruction_from_the_evaluation_module_runs_on_the_vq_backend(models, tmp_path):
    from synth.evaluate import reconstruction
    from tests.conftest import write_prepared

    data = write_prepared(tmp_path / "prep", ages=(30, 60), size=32, split="test")
    gen = load_generator(models / "tiny-vq-model", device="cpu")
    r = reconstruction(gen, data)
    assert r["n"] == 2 and np.isfinite(r["psnr_mean"]) and -1 <= r["ssim_mean"] <= 1
