"""The neural codec: round trips on volumes made here, its file format, and refusals of bad files."""

import struct
import zlib

import numpy as np
import pytest
import torch

from synth.cli import main
from synth.codec import MAGIC, CodecError, code_probabilities, compress, decompress, read_header
from synth.io import load_nifti, save_nifti
from synth.vq.generator import VQBrainGenerator
from synth.vq.testing import make_tiny_vq_model
from synth.vq.transformer import fast_transformers_available

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return make_tiny_vq_model(tmp_path_factory.mktemp("vq") / "tiny-vq-model", seed=0, shape=SHAPE)


@pytest.fixture(scope="module")
def gen(vq_dir):
    return VQBrainGenerator.from_folder(vq_dir, device="cpu", engine="torch")


def phantom(seed=0, scale=1000.0):
    """A brain-like blob with texture, in scanner-like units."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    mask = (g**2).sum(0) < 0.6
    return (scale * mask * (0.6 + 0.3 * np.sin(4 * g[0] + seed) + rng.normal(0, 0.03, SHAPE))).clip(0).astype(np.float32)


def test_round_trip_is_exactly_the_models_reconstruction(gen):
    img = phantom()
    data = compress(img, gen.grid.affine, gen)
    back, affine, h = decompress(data, gen)
    x = np.clip(img / h.scale, 0, 1)
    expected = gen.decode_codes(gen.encode_image(x)) * np.float32(h.scale)
    assert np.array_equal(back, expected.astype(np.float32))
    assert np.allclose(affine, gen.grid.affine, atol=1e-4)
    assert h.model == "tiny-vq-model" and h.engine == "torch" and h.code_shape == (8, 8, 8)
    assert h.scale == pytest.approx(np.percentile(img[img > 0], 99.5), rel=1e-5) and h.offset == 0.0
    assert data[:4] == MAGIC and compress(img, gen.grid.affine, gen) == data  # deterministic bytes
    assert data[4] == 1 and h.version == 1 and h.schedule == "sequential"  # a model without `wavefront`: as before


def test_payload_is_the_transformers_cross_entropy(gen):
    img = phantom(1)
    codes = gen.encode_image(np.clip(img / np.percentile(img[img > 0], 99.5), 0, 1)).flatten().numpy()
    probs = code_probabilities(gen.transformer, codes, gen.null_condition())
    bits = -np.log2(probs[np.arange(len(codes)), codes]).sum()
    payload = len(read_header(compress(img, gen.grid.affine, gen)).payload) * 8
    assert bits <= payload <= bits + 64  # range coding costs at most a few words over the information content


def test_negative_intensities_are_offset_and_restored(gen):
    img = phantom(2) - 200.0
    back, _, h = decompress(compress(img, gen.grid.affine, gen), gen)
    assert h.offset == pytest.approx(float(img.min()))
    assert back.min() >= h.offset - 1e-3 and back.max() <= h.offset + h.scale + 1e-3


def test_damaged_truncated_and_foreign_files_are_refused(gen, tmp_path):
    data = compress(phantom(), gen.grid.affine, gen)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x40
    with pytest.raises(CodecError, match="damaged"):
        decompress(bytes(damaged), gen)
    with pytest.raises(CodecError, match="truncated"):
        decompress(data[:-7], gen)
    with pytest.raises(CodecError, match="truncated"):
        decompress(data[:20], gen)
    with pytest.raises(CodecError, match="not a SynthBrain .sbz"):
        decompress(b"\x1f\x8b\x08\x00" + data[4:], gen)
    future = bytearray(data)
    future[4] = 9
    with pytest.raises(CodecError, match="format version 9"):
        decompress(bytes(future), gen)


def test_a_file_from_other_weights_is_refused(gen, tmp_path):
    other = VQBrainGenerator.from_folder(make_tiny_vq_model(tmp_path / "tiny-vq-model", seed=1, shape=SHAPE),
                                         device="cpu", engine="torch")
    data = compress(phantom(), gen.grid.affine, gen)
    with pytest.raises(CodecError, match="written by model tiny-vq-model .* the loaded model"):
        decompress(data, other)


def test_a_diverging_decode_is_caught_by_the_codes_checksum(gen):
    data = bytearray(compress(phantom(), gen.grid.affine, gen))
    n = data[7]
    crc_at = 8 + n + 16 + 6 + 3 + 48 + 8
    struct.pack_into("<I", data, crc_at, struct.unpack_from("<I", data, crc_at)[0] ^ 1)
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))  # a consistent file checksum
    with pytest.raises(CodecError, match="diverged"):
        decompress(bytes(data), gen)


@pytest.mark.skipif(not fast_transformers_available(), reason="pytorch-fast-transformers is not installed")
def test_fast_transformers_engine_round_trips_and_cross_engine_decoding_is_checked(vq_dir):
    ft = VQBrainGenerator.from_folder(vq_dir, device="cpu", engine="fast-transformers")
    pt = VQBrainGenerator.from_folder(vq_dir, device="cpu", engine="torch")
    assert ft.weights_hash == pt.weights_hash
    data = compress(phantom(), ft.grid.affine, ft)
    back, _, h = decompress(data, ft)
    assert h.engine == "fast-transformers"
    try:  # the other engine: either bit-identical probabilities, or the clear divergence error
        other, _, _ = decompress(data, pt)
        assert np.array_equal(other, back)
    except CodecError as exc:
        assert "diverged" in str(exc)


# -- the wavefront schedule ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wave_dir(tmp_path_factory):
    return make_tiny_vq_model(tmp_path_factory.mktemp("vqw") / "tiny-vq-model", seed=0, shape=SHAPE, wavefront=True)


@pytest.fixture(scope="module")
def wave(wave_dir):
    return VQBrainGenerator.from_folder(wave_dir, device="cpu", engine="torch")


def _resealed(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    struct.pack_into("<I", out, len(out) - 4, zlib.crc32(bytes(out[:-4])))
    return bytes(out)


def test_wavefront_model_round_trips_exactly_as_format_version_2(wave):
    assert wave.transformer.schedule == "wavefront" and wave.transformer.config["window"] == 64
    img = phantom(4)
    data = compress(img, wave.grid.affine, wave)
    back, _, h = decompress(data, wave)
    x = np.clip(img / h.scale, 0, 1)
    codes = wave.encode_image(x)
    assert np.array_equal(back, (wave.decode_codes(codes) * np.float32(h.scale)).astype(np.float32))
    assert data[4] == 2 and data[5] & 2 and h.version == 2 and h.schedule == "wavefront"
    assert compress(img, wave.grid.affine, wave) == data
    # the payload is the model's cross-entropy: the wavefront's probabilities are the model's own
    probs = code_probabilities(wave.transformer, codes.flatten().numpy(), wave.null_condition())
    seq = code_probabilities(wave.transformer, codes.flatten().numpy(), wave.null_condition(), schedule="sequential")
    assert np.abs(probs - seq).max() < 1e-5
    bits = -np.log2(probs[np.arange(probs.shape[0]), codes.flatten().numpy()]).sum()
    assert bits - 32 <= len(h.payload) * 8 <= bits + 64  # give or take the coder's quantised probabilities


def test_wavefront_files_refuse_damage_other_schedules_and_models_without_the_flag(wave, gen):
    data = compress(phantom(), wave.grid.affine, wave)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x40
    with pytest.raises(CodecError, match="damaged"):
        decompress(bytes(damaged), wave)
    with pytest.raises(CodecError, match="truncated"):
        decompress(data[:-5], wave)
    with pytest.raises(CodecError, match="format version 3; this SynthBrain reads versions 1, 2"):
        decompress(_resealed(data, 4, 3), wave)
    with pytest.raises(CodecError, match="unknown flags"):
        decompress(_resealed(data, 4, 1), wave)  # version 1 has no schedule bit
    with pytest.raises(CodecError, match="unknown flags"):
        decompress(_resealed(data, 5, data[5] | 4), wave)
    with pytest.raises(CodecError, match="diverged"):  # read in the other order: caught by the codes' CRC
        decompress(_resealed(data, 5, data[5] & ~2), wave)
    # `gen`: the same seed's weights under a config without the flag (same hash): refused before decoding
    assert gen.weights_hash == wave.weights_hash and not gen.transformer.config["wavefront"]
    with pytest.raises(CodecError, match="coded with the wavefront schedule, but this model has no `wavefront` flag"):
        decompress(data, gen)
    # without the flag the same weights write and read sequential version-1 files; both hold the same codes
    v1 = compress(phantom(), gen.grid.affine, gen)
    assert v1[4] == 1 and np.array_equal(decompress(v1, gen)[0], decompress(data, wave)[0])


@pytest.mark.skipif(not fast_transformers_available(), reason="pytorch-fast-transformers is not installed")
def test_wavefront_round_trips_on_fast_transformers(wave_dir):
    ft = VQBrainGenerator.from_folder(wave_dir, device="cpu", engine="fast-transformers")
    assert ft.transformer.schedule == "wavefront"
    data = compress(phantom(5), ft.grid.affine, ft)
    back, _, h = decompress(data, ft)
    assert h.engine == "fast-transformers" and h.schedule == "wavefront"
    ref = ft.decode_codes(ft.encode_image(np.clip(phantom(5) / h.scale, 0, 1))) * np.float32(h.scale)
    assert np.array_equal(back, ref.astype(np.float32))


def test_wrong_shape_is_refused(gen):
    with pytest.raises(CodecError, match="model grid's shape"):
        compress(np.zeros((16, 16, 8), np.float32), np.eye(4), gen)


# -- command line --------------------------------------------------------------------------------
def test_cli_round_trip_with_sidecar(vq_dir, gen, tmp_path, capsys):
    src, sbz, out = tmp_path / "t1.nii.gz", tmp_path / "t1.sbz", tmp_path / "back.nii.gz"
    img = phantom(3)
    save_nifti(src, img, gen.grid.affine)
    assert main(["compress", str(src), str(sbz), "--model", str(vq_dir), "--engine", "torch"]) == 0
    said = capsys.readouterr().out
    assert "engine torch" in said and "% of the uint8 voxels" in said
    assert main(["decompress", str(sbz), str(out), "--model", str(vq_dir), "--engine", "torch"]) == 0
    back, affine = load_nifti(out)
    ref, _, _ = decompress(sbz.read_bytes(), gen)
    assert np.allclose(back, ref) and np.allclose(affine, gen.grid.affine, atol=1e-4)
    import json

    side = json.loads((tmp_path / "back.json").read_text())
    assert "NOT FOR CLINICAL USE" in side["notice"] and side["codec"]["format"] == "sbz v1"
    assert side["history"][-1]["command"] == "decompress"
    # refusing to overwrite, nothing changed
    before = out.read_bytes()
    assert main(["decompress", str(sbz), str(out), "--model", str(vq_dir)]) == 2
    assert out.read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_refuses_off_grid_input_and_damaged_files_writing_nothing(vq_dir, gen, tmp_path, capsys):
    off = tmp_path / "off.nii.gz"
    save_nifti(off, phantom(), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert main(["compress", str(off), str(tmp_path / "x.sbz"), "--model", str(vq_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not on the model grid" in err and "--register" in err
    assert not (tmp_path / "x.sbz").exists()
    bad = tmp_path / "bad.sbz"
    bad.write_bytes(b"hello, not a codec file")
    assert main(["decompress", str(bad), str(tmp_path / "y.nii.gz"), "--model", str(vq_dir)]) == 2
    assert "not a SynthBrain .sbz" in capsys.readouterr().err
    assert not (tmp_path / "y.nii.gz").exists() and not (tmp_path / "y.json").exists()
    assert main(["compress", str(off), str(tmp_path / "x.zip"), "--model", str(vq_dir)]) == 2
    assert main(["compress", str(off), str(tmp_path / "x.sbz"), "--engine", "warp"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.sbz", "off.nii.gz"]


def test_cli_needs_a_vq_model(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "t1.nii.gz"
    save_nifti(src, phantom(), np.eye(4))
    assert main(["compress", str(src), str(tmp_path / "o.sbz"), "--model", str(tiny_model_dir)]) == 2
    assert "is a ldm model; the codec needs a vq model" in capsys.readouterr().err
