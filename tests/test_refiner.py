"""The refiner after the decoder: network, training (resumable), packaging, generation and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from synth.testing import add_fast_preset
from tests.conftest import write_prepared

TINY_DISC = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": 4, "num_layers_d": 2, "norm": "INSTANCE"}


def test_refiner_starts_as_identity_and_crop_is_exact():
    from synth.models.refiner import Refiner, refine_volume

    net = Refiner(width=4, layers=3)
    rng = np.random.default_rng(0)
    img = np.zeros((24, 28, 20), np.float32)
    img[5:18, 6:20, 4:15] = rng.uniform(0.2, 0.9, (13, 14, 11))
    assert np.allclose(refine_volume(net, img), img)  # zero-initialised last layer: the identity
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    out = refine_volume(net, img)
    with torch.no_grad():
        full = net(torch.from_numpy(img)[None, None])[0, 0].clamp(0, 1).numpy()
    inside = img > 0
    assert not np.allclose(out[inside], img[inside], atol=1e-3)  # it does change the brain
    np.testing.assert_allclose(out[inside], full[inside], atol=1e-5)  # the bounding box gives the whole volume's values
    assert (out[~inside] == 0).all() and out.min() >= 0 and out.max() <= 1


def test_refiner_rejects_bad_shapes():
    from synth.models.refiner import Refiner, refine_volume

    with pytest.raises(ValueError, match="layers >= 2"):
        Refiner(width=4, layers=1)
    with pytest.raises(ValueError, match=r"expects an \(X, Y, Z\) volume"):
        refine_volume(Refiner(4, 2), np.zeros((2, 8, 8, 8), np.float32))


def _randomised(net, std=0.2, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def test_context_branch_is_exact_on_the_brain_box_and_on_training_cubes():
    from synth.models.refiner import Refiner, context_pad, receptive_radius, refine_volume

    net = Refiner(width=4, layers=2, context=1)
    assert context_pad(net) == 16 and receptive_radius(net) == 18
    rng = np.random.default_rng(0)
    img = np.zeros((58, 61, 54), np.float32)  # not multiples of 4; the brain box not on the 8 mm grid
    img[21:39, 23:42, 19:36] = rng.uniform(0.2, 0.9, (18, 19, 17))
    assert np.allclose(refine_volume(net, img), img)  # both output layers start at zero
    _randomised(net)
    with torch.no_grad():
        whole = net(torch.from_numpy(img)[None, None])
    out = refine_volume(net, img)
    inside = img > 0
    np.testing.assert_allclose(out[inside], whole[0, 0].clamp(0, 1).numpy()[inside], atol=1e-5)
    # a training cube with its context cube gives the whole volume's values away from its faces, when the
    # context cube starts on the whole volume's 8 mm grid (a multiple of 4)
    pad, c, m = context_pad(net), 12, net.layers
    big = np.pad(img, pad)
    for corner in [(24, 28, 20), (20, 24, 24)]:
        a, b, d = corner
        cube = torch.from_numpy(img[a:a + c, b:b + c, d:d + c].copy())[None, None]
        ctx = torch.from_numpy(big[a:a + c + 2 * pad, b:b + c + 2 * pad, d:d + c + 2 * pad].copy())[None, None]
        with torch.no_grad():
            y = net(cube, ctx)[0, 0, m:-m, m:-m, m:-m]
        torch.testing.assert_close(y, whole[0, 0, a + m:a + c - m, b + m:b + c - m, d + m:d + c - m], atol=1e-5, rtol=0)
    # the branch's crop may start off its pooling grid, by a different amount along each axis
    x = torch.from_numpy(img)[None, None]
    with torch.no_grad():
        part = net.context_features(x, (21, 6, 30), (9, 17, 5))
        torch.testing.assert_close(part, net.context_features(x)[..., 21:30, 6:23, 30:35], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must lie inside its input"):
        net.context_features(torch.zeros(1, 1, 16, 16, 16), offset=10, size=(8, 8, 8))


def test_context_branch_sees_farther_than_the_plain_refiner():
    from synth.models.refiner import Refiner

    img = torch.zeros(1, 1, 48, 48, 48)
    img[..., 10, 24, 24] = 1.0  # one voxel 14 away from the probed one at x = 24
    plain, wide = _randomised(Refiner(4, 3)), _randomised(Refiner(4, 3, context=2))
    with torch.no_grad():
        for net, sees in ((plain, False), (wide, True)):
            moved = (net(img) - net(torch.zeros_like(img)))[0, 0, 24, 24, 24].abs().item()
            assert (moved > 1e-6) == sees, (net.context, moved)


def test_refiner_starts_a_context_branch_from_a_plain_one():
    from synth.models.refiner import Refiner
    from synth.train.refiner import _load_init

    plain = _randomised(Refiner(4, 3))
    wide = Refiner(4, 3, context=1)
    _load_init(wide, plain.state_dict(), "plain")
    x = torch.rand(1, 1, 20, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), plain(x))  # the branch's zero output layer: the same refiner
    with pytest.raises(ValueError, match="does not fit"):
        _load_init(Refiner(4, 3), wide.state_dict(), "wide")  # a branch cannot be dropped
    with pytest.raises(ValueError, match="does not fit"):
        _load_init(Refiner(4, 4, context=1), plain.state_dict(), "plain")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny refiner trained 6 steps, stopped after 3 and resumed (beside an uninterrupted 6-step run)."""
    from synth.train.refiner import RefinerTrainConfig, train_refiner

    root = tmp_path_factory.mktemp("refiner")
    data = write_prepared(root / "data", ages=(25, 40, 60, 75), split="train")

    def cfg(run, steps):
        return RefinerTrainConfig(data_dir=str(data.root), model=str(tiny_model_dir), run_dir=str(root / run), steps=steps,
                                  batch_size=2, crop=16, samples=2, refiner={"width": 4, "layers": 2},
                                  discriminator=dict(TINY_DISC), ckpt_every=1, snap_every=3)

    whole = train_refiner(cfg("whole", 6), progress=False)
    train_refiner(cfg("split", 3), progress=False)
    resumed = train_refiner(cfg("split", 6), progress=False)
    return root, whole, resumed


def test_train_refiner_learns_resumes_and_snapshots(trained):
    root, whole, resumed = trained
    assert whole["step"] == resumed["step"] == 6
    for k, v in whole["ema_state_dict"].items():  # a resumed run draws what the uninterrupted one drew
        torch.testing.assert_close(resumed["ema_state_dict"][k], v)
    assert whole["state_dict"]["out.weight"].abs().sum() > 0  # it moved off the identity
    rows = (root / "whole" / "losses.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "time_s", "l1", "grad", "lowpass", "speckle", "speckled", "adv", "disc"]
    assert len(rows) == 7
    assert [r.split(",")[0] for r in (root / "split" / "losses.csv").read_text().splitlines()[1:]] == [str(i) for i in range(1, 7)]
    assert sorted(p.name for p in (root / "whole" / "snaps").iterdir()) == ["step_000003.pt", "step_000006.pt"]
    samples = np.load(root / "whole" / "samples.npy")
    assert samples.shape == (2, 32, 32, 32) and samples.max() > 0  # generated, unrefined brains


def test_package_generate_and_provenance(trained, tiny_model_dir, tmp_path):
    import synth
    from synth.condition import Condition
    from synth.train.refiner import package_refiner

    root, whole, _ = trained
    out = package_refiner(root / "whole", tiny_model_dir, tmp_path / "with-refiner", version="0.0.1-test")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["version"] == "0.0.1-test" and cfg["refiner"]["steps"] == 6 and cfg["refiner"]["default"] is True
    assert set(cfg["weights_sha256"]) == {"autoencoder.safetensors", "unet.safetensors", "refiner.safetensors"}
    assert "6 steps of train-refiner" in cfg["refiner"]["trained"]

    add_fast_preset(out)  # as the shipped model has
    gen = synth.load_generator(out, device="cpu")
    base = synth.load_generator(tiny_model_dir, device="cpu")
    c = Condition(age=60, sex="F")
    refined, plain, again = gen.generate(c, seed=2), gen.generate(c, seed=2, refine=False), gen.generate(c, seed=2)
    np.testing.assert_array_equal(refined.image, again.image)  # same seed, same brain
    np.testing.assert_allclose(plain.image, base.generate(c, seed=2).image, atol=1e-6)  # switched off: the model as it was
    assert not np.allclose(refined.image, plain.image)
    np.testing.assert_allclose(refined.image, gen.refine(plain.image), atol=1e-6)
    # a brain shown at once and refined a moment later is the refined brain, provenance included
    later = gen.refine_brain(plain)
    np.testing.assert_allclose(later.image, refined.image, atol=1e-6)
    assert later.provenance["refiner"] == refined.provenance["refiner"] and plain.provenance["refiner"]["applied"] is False
    assert {k: v for k, v in later.provenance.items() if k != "refiner"} == \
        {k: v for k, v in plain.provenance.items() if k != "refiner"}
    with pytest.raises(ValueError, match="refined already"):
        gen.refine_brain(refined)
    with pytest.raises(ValueError, match="made by tiny-test-model 0.0.0-test, not by tiny-test-model 0.0.1-test"):
        gen.refine_brain(base.generate(c, seed=2))
    import dataclasses

    from synth import provenance as _provenance

    edited = dataclasses.replace(plain, provenance={**plain.provenance, "history": [
        *plain.provenance["history"], _provenance.step("match_volumes")]})
    with pytest.raises(ValueError, match=r"edited after sampling \(match_volumes\)"):
        gen.refine_brain(edited)
    assert refined.provenance["refiner"]["applied"] is True and refined.provenance["refiner"]["steps"] == 6
    assert plain.provenance["refiner"]["applied"] is False
    assert base.generate(c, seed=2).provenance["refiner"] == "none"
    # the fast preset leaves the refiner out unless asked (it would cost about as much as the fast sampling)
    assert gen.refines_by_default_for(fast=False) and not gen.refines_by_default_for(fast=True)
    quick = gen.generate(c, seed=2, fast=True)
    assert quick.provenance["refiner"]["applied"] is False
    assert gen.generate(c, seed=2, fast=True, refine=True).provenance["refiner"]["applied"] is True
    with pytest.raises(ValueError, match="has no refiner"):
        base.generate(c, seed=2, refine=True)

    # the report's brain cache keeps brains before the refiner and refines them as it loads them, so a
    # model whose refiner changed reuses its samples
    from synth.report import _cached

    cache = tmp_path / "cache"
    hit = _cached(gen, c, 2, {}, cache)
    files = list(cache.glob("*.nii.gz"))
    assert len(files) == 1 and "refine-False" in files[0].name
    np.testing.assert_allclose(hit.image, refined.image, atol=1e-5)
    assert hit.provenance["refiner"]["applied"] is True
    np.testing.assert_allclose(_cached(gen, c, 2, {"refine": False}, cache).image, plain.image, atol=1e-6)
    assert _cached(gen, c, 2, {"fast": True}, cache).provenance["refiner"]["applied"] is False
    with torch.no_grad():
        gen.refiner.out.bias.add_(0.05)  # another refiner on the same model
    gen.config.weights_sha256["refiner.safetensors"] = "0" * 64
    moved = _cached(gen, c, 2, {}, cache)
    assert len(list(cache.glob("*.nii.gz"))) == 2  # the fast preset's brain; no new default one
    np.testing.assert_allclose(moved.image, gen.refine(plain.image), atol=1e-5)
    assert not np.allclose(moved.image, hit.image)

    # a tampered refiner is refused before it is read
    (out / "refiner.safetensors").write_bytes((out / "refiner.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="refiner.safetensors"):
        synth.load_generator(out, device="cpu")


def test_context_refiner_trains_from_a_plain_run_and_ships(trained, tiny_model_dir, tmp_path):
    import synth
    from synth.condition import Condition
    from synth.train.refiner import RefinerTrainConfig, package_refiner, train_refiner

    root, whole, _ = trained
    run = tmp_path / "ctx"
    run.mkdir()
    for f in ("pairs.npy", "samples.npy"):  # the plain run's cached volumes: the same model and data
        shutil.copy(root / "whole" / f, run / f)
    cfg = RefinerTrainConfig(data_dir=str(root / "data"), model=str(tiny_model_dir), run_dir=str(run), steps=2,
                             batch_size=2, crop=16, samples=2, refiner={"width": 4, "layers": 2, "context": 1},
                             discriminator=dict(TINY_DISC), init_from=str(root / "whole"),
                             init_discriminator_from=str(root / "whole"))
    state = train_refiner(cfg, progress=False)
    assert state["step"] == 2 and "(step 6)" in state["init_from"]
    assert f"discriminator from {root.name}/whole (step 6)" in state["init_from"]  # no absolute path
    from synth.train.refiner import _without_absolute_paths

    assert _without_absolute_paths("refiner of m 0.4.0; discriminator from /root/runs/refiner-lib/run (step 2700)") \
        == "refiner of m 0.4.0; discriminator from refiner-lib/run (step 2700)"
    for k, v in whole["discriminator"].items():  # its discriminator went on from the plain run's
        torch.testing.assert_close(state["discriminator"][k], v, atol=2e-3, rtol=0)
    torch.testing.assert_close(state["ema_state_dict"]["body.0.weight"], whole["ema_state_dict"]["body.0.weight"],
                               atol=1e-2, rtol=0)  # it started from the plain refiner ...
    assert state["state_dict"]["ctx_out.weight"].abs().sum() > 0  # ... and trained its new branch
    snapshot = root / "whole" / "snaps" / "step_000003.pt"  # a snapshot keeps no discriminator: refused
    with pytest.raises(ValueError, match="holds no discriminator"):
        train_refiner(RefinerTrainConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "other"),
                                            "init_discriminator_from": str(snapshot)}), progress=False)
    assert not (tmp_path / "other").exists()  # refused before any volume was computed
    out = package_refiner(run, tiny_model_dir, tmp_path / "model", version="0.0.2-test")
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["refiner"]["context"] == 1 and cfg_json["refiner"]["layers"] == 2
    gen = synth.load_generator(out, device="cpu")
    assert gen.refiner.context == 1
    b = gen.generate(Condition(age=50, sex="M"), seed=3)
    assert b.provenance["refiner"]["applied"] is True and b.image.max() <= 1
    assert b.provenance["refiner"]["network"] == "2 conv3d layers, width 4, context branch of 1 conv3d layer at 8 mm"


def test_package_off_by_default_and_into_own_folder(trained, tiny_model_dir, tmp_path):
    import synth
    from synth.condition import Condition
    from synth.train.refiner import package_refiner

    root, _, _ = trained
    own = shutil.copytree(tiny_model_dir, tmp_path / "own")
    package_refiner(root / "whole" / "snaps" / "step_000003.pt", own, own, default=False)
    gen = synth.load_generator(own, device="cpu")
    assert gen.config.refiner["steps"] == 3 and gen.config.version == "0.0.0-test"
    b = gen.generate(Condition(age=40, sex="M"), seed=0)
    assert b.provenance["refiner"]["applied"] is False
    assert gen.generate(Condition(age=40, sex="M"), seed=0, refine=True).provenance["refiner"]["applied"] is True


def test_cli_train_package_generate(trained, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from synth.cli import main

    root, _, _ = trained
    assert main(["package-refiner", "--run", str(root / "whole"), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "m")]) == 0
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tmp_path))
    assert main(["models"]) == 0
    assert "m\tldm\t0.0.0-test\trefiner (on by default, off with --fast)" in capsys.readouterr().out
    assert main(["generate", "--age", "50", "--sex", "F", "--model", str(tmp_path / "m"), "--device", "cpu",
                 "--out", str(tmp_path / "a.nii.gz"), "--no-refiner", "--quiet"]) == 0
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["refiner"]["applied"] is False
    # bad input: one line, exit 2, nothing written
    assert main(["generate", "--age", "50", "--sex", "F", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path / "b.nii.gz"), "--refiner", "--quiet"]) == 2
    assert "has no refiner" in capsys.readouterr().err and not (tmp_path / "b.nii.gz").exists()
    assert main(["train-refiner", "--run", str(tmp_path / "r"), "--data", str(root / "data"), "--crop", "20"]) == 2
    assert "--crop must be at least 34 voxels" in capsys.readouterr().err
    assert main(["package-refiner", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "--run expects a train-refiner run folder" in capsys.readouterr().err


def test_speckle_penalty_sees_isolated_voxels_only():
    from synth.train.refiner import median3, speckle_excess

    g = torch.linspace(0, 1, 12)
    smooth = (g[:, None, None] + g[None, :, None] + g[None, None, :])[None, None] / 3  # a ramp: no speckle
    assert speckle_excess(smooth, 0.2).item() == 0
    dotted = smooth.clone()
    dotted[0, 0, 5, 6, 7] += 0.5  # one bright voxel
    torch.testing.assert_close(median3(dotted), median3(smooth))  # the median ignores it
    excess = speckle_excess(dotted, 0.2).item()
    assert excess == pytest.approx((0.5 - 0.2) / 10**3, rel=1e-4)  # only that voxel, 0.3 beyond the margin
    dotted.requires_grad_(True)
    speckle_excess(dotted, 0.2).backward()
    assert dotted.grad[0, 0, 5, 6, 7] > 0 and (dotted.grad != 0).sum() <= 27  # pulls the dot down, locally


def test_viewer_refiner_switch(trained, tiny_model_dir, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import synth
    from synth.train.refiner import package_refiner
    from viewer import service

    root, _, _ = trained
    models = tmp_path / "models"
    package_refiner(root / "whole", tiny_model_dir, models / "with-refiner")
    shutil.copytree(tiny_model_dir, models / "plain")
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    choices = service.model_choices()
    assert choices["with-refiner"].has_refiner and choices["with-refiner"].refiner_default
    assert not choices["plain"].has_refiner
    names = list(choices)
    gen = synth.load_generator(models / "with-refiner", device="cpu")
    ask = dict(age=60, sex="F", diagnosis="CN", seed=1, models=names)
    on = service.run_generation(gen, service.parse_request(model="with-refiner", refine=True, **ask)).brain
    off = service.run_generation(gen, service.parse_request(model="with-refiner", refine=False, **ask)).brain
    assert on.provenance["refiner"]["applied"] and not off.provenance["refiner"]["applied"]
    assert service.sampling_caption(on.provenance).endswith("· refined")
    assert service.sampling_caption(off.provenance).endswith("· refiner off")
    assert service.parse_request(model="with-refiner", refine=True, **ask).key() != \
        service.parse_request(model="with-refiner", refine=False, **ask).key()
    plain = synth.load_generator(models / "plain", device="cpu")
    with pytest.raises(ValueError, match="has no refiner: switch Refiner off"):
        service.run_generation(plain, service.parse_request(model="plain", refine=True, **ask))
    with pytest.raises(TypeError, match="`refine` must be True, False or None"):
        service.parse_request(model="plain", refine="yes", **ask)


def test_viewer_page_applies_the_refiner_box(trained, tiny_model_dir, tmp_path, monkeypatch):
    """The sidebar's Refiner box reaches the generator: off, on and auto (the model's default: on) each give
    the brain its provenance says, and the page's caption says which. With Fast preview and auto the page
    shows the brain at once and swaps in its refined texture after: the brain ``refine=True`` gives."""
    import sys
    from pathlib import Path

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    import synth
    from synth.train.refiner import package_refiner

    root, _, _ = trained
    models = tmp_path / "models"
    folder = package_refiner(root / "whole", tiny_model_dir, models / "with-refiner")
    add_fast_preset(folder)  # as the shipped model has
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    monkeypatch.setenv("SYNTHBRAIN_SEGMENTER", "none-here")  # labels are not the point: the page notes their absence
    monkeypatch.setenv("SYNTHBRAIN_THREADS", "2")  # the same threads for every brain, however busy the machine is
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "viewer" / "app.py"), default_timeout=180)
    at.run()
    gen = synth.load_generator(folder, device="cpu")
    condition = synth.Condition(at.session_state["age"], at.session_state["sex"], at.session_state["diagnosis"])
    for speed in ("standard", "fast"):
        next(w for w in at.radio if w.key == "speed").set_value(speed)
        images = {}
        for choice in ("off", "on", "auto"):
            next(w for w in at.selectbox if w.key == "refine").set_value(choice)
            at.sidebar.button(key="generate").click()
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            result = at.session_state["result"]
            applied = result.brain.provenance["refiner"]["applied"]
            assert applied is (choice != "off"), (speed, choice, result.brain.provenance["refiner"])
            assert result.brain.provenance["sampling_preset"] == speed
            assert any(("· refined" if applied else "· refiner off") in m.value for m in at.markdown)
            assert not at.session_state["refine_pending"]
            images[choice] = result.brain.image
        assert not np.array_equal(images["off"], images["on"])
        np.testing.assert_allclose(images["auto"], images["on"], atol=1e-6)
        library = gen.generate(condition, seed=at.session_state["seed"], fast=speed == "fast", refine=True)
        np.testing.assert_allclose(images["auto"], library.image, atol=1e-6)
    assert "refine" in at.session_state["result"].seconds  # fast + auto: refined after it was shown
    # a refiner that fails after the brain is shown leaves that brain on the page, saying why
    from synth.models.refiner import RefinerMixin

    def broken(self, brain):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(RefinerMixin, "refine_brain", broken)
    next(w for w in at.number_input if w.key == "seed").set_value(at.session_state["seed"] + 1)
    at.sidebar.button(key="generate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    result = at.session_state["result"]
    assert result.brain.provenance["refiner"]["applied"] is False and "refining failed (RuntimeError: out of memory)" in result.note
    assert any("refining failed" in c.value for c in at.caption)


def test_refiner_error_paths(trained, tiny_model_dir, tmp_path, capsys):
    import synth
    from synth.cli import main
    from synth.train.refiner import RefinerTrainConfig, package_refiner

    root, _, _ = trained
    out = package_refiner(root / "whole", tiny_model_dir, tmp_path / "m")
    (out / "refiner.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights file refiner.safetensors is missing"):  # checked with the hashes
        synth.load_generator(out, device="cpu")
    with pytest.raises(ValueError, match="is not a refiner checkpoint written by train-refiner"):
        torch.save({"step": 1}, tmp_path / "other.pt")
        package_refiner(tmp_path / "other.pt", tiny_model_dir, tmp_path / "n")
    with pytest.raises(ValueError, match="`speckle_weight` must be >= 0"):
        RefinerTrainConfig(data_dir="", model="", run_dir="", speckle_weight=-1)
    with pytest.raises(ValueError, match="inner cube of at least 24 voxels"):
        RefinerTrainConfig(data_dir="", model="", run_dir="", crop=30)
    assert main(["train-refiner", "--run", str(tmp_path / "r"), "--data", str(root / "data"),
                 "--init-from", str(tmp_path / "missing")]) == 2
    assert "--init-from expects a train-refiner run folder" in capsys.readouterr().err
    assert main(["train-refiner", "--run", str(tmp_path / "r"), "--data", str(tmp_path)]) == 2
    assert "--data expects a folder written by `synthbrain prepare`" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


def test_vq_model_trains_ships_and_applies_a_refiner(tmp_path, capsys, monkeypatch):
    """The VQ-VAE backend takes a refiner as the latent diffusion one does: trained on its reconstructions
    and samples, packaged beside its weights, applied by default and named in the provenance."""
    import synth
    from synth.cli import main
    from synth.condition import Condition
    from synth.models.refiner import build_refiner, refine_volume
    from synth.train.refiner import RefinerTrainConfig, package_refiner, train_refiner
    from synth.vq.testing import make_tiny_vq_model

    vq = make_tiny_vq_model(tmp_path / "vq", shape=(16, 16, 16))
    data = write_prepared(tmp_path / "data", ages=(25, 40, 60, 75), size=16, split="train")
    run = tmp_path / "run"
    state = train_refiner(RefinerTrainConfig(data_dir=str(data.root), model=str(vq), run_dir=str(run), steps=3,
                                             batch_size=2, crop=16, samples=2, refiner={"width": 4, "layers": 2},
                                             discriminator=dict(TINY_DISC)), progress=False)
    assert state["step"] == 3 and np.load(run / "samples.npy").shape == (2, 16, 16, 16)
    out = package_refiner(run, vq, tmp_path / "vq-refined", version="0.0.1-test")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend"] == "vq" and cfg["refiner"]["steps"] == 3 and cfg["refiner"]["default"] is True
    assert set(cfg["weights_sha256"]) == {"vqvae.safetensors", "transformer.safetensors", "refiner.safetensors"}

    gen, base = synth.load_generator(out, device="cpu"), synth.load_generator(vq, device="cpu")
    assert gen.backend == "vq" and base.refiner is None
    c = Condition(age=60, sex="F")
    refined, plain = gen.generate(c, seed=2), gen.generate(c, seed=2, refine=False)
    np.testing.assert_array_equal(plain.image, base.generate(c, seed=2).image)  # switched off: the model as it was
    net = build_refiner(state["config"]["refiner"])
    net.load_state_dict(state["ema_state_dict"])
    np.testing.assert_allclose(refined.image, refine_volume(net, plain.image), atol=2e-3)  # the run's EMA, as fp16
    np.testing.assert_allclose(refined.image, gen.refine(plain.image), atol=1e-6)
    assert np.abs(refined.image - plain.image).max() > 1e-4  # three steps moved it
    assert refined.provenance["refiner"]["applied"] is True and plain.provenance["refiner"]["applied"] is False
    assert base.generate(c, seed=2).provenance["refiner"] == "none"
    with pytest.raises(ValueError, match="has no refiner"):
        base.generate(c, seed=2, refine=True)
    # a config naming a refiner whose file is gone (and unhashed): one clear error before any weights are read
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "refiner.safetensors").unlink()
    raw = json.loads((broken / "config.json").read_text())
    raw["weights_sha256"].pop("refiner.safetensors")
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError, match="names a refiner but has no refiner.safetensors"):
        synth.load_generator(broken, device="cpu")
    # the CLI: listed with its refiner (no --fast to mention), generate with and without it
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tmp_path))
    assert main(["models"]) == 0
    assert "vq-refined\tvq\t0.0.1-test\trefiner (on by default)\n" in capsys.readouterr().out
    assert main(["generate", "--age", "50", "--sex", "M", "--model", str(out), "--device", "cpu",
                 "--out", str(tmp_path / "a.nii.gz"), "--no-refiner", "--quiet"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["refiner"]["applied"] is False
    assert "+ refiner" not in capsys.readouterr().out
    assert main(["generate", "--age", "50", "--sex", "M", "--model", str(out), "--device", "cpu",
                 "--out", str(tmp_path / "b.nii.gz"), "--quiet"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["refiner"]["applied"] is True
    assert " + refiner, fp32; synthetic, not for clinical use" in capsys.readouterr().out
