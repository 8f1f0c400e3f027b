"""Neural codec: a T1 volume on the model grid -> VQ-VAE codes -> range coding with the transformer's
own probabilities -> a few kilobytes (``.sbz``), and back.

Each code is entropy-coded with the distribution the transformer predicts from the codes decoded
before it (unconditional input: a scan's age or sex is not known), through ``constriction``'s
range coder (Bamler 2022); the expected size is the transformer's cross-entropy on the codes. The
codes are visited in the order of the model's decoding schedule
(:attr:`synth.vq.transformer.CodeTransformer.schedule`): raster order token by token
(``sequential``), or, for a model trained with ``wavefront``, all x-slabs side by side, each one
position behind the one before (:func:`synth.vq.transformer.wavefront_order`; 499 batched steps
instead of 9,600). Encoding and decoding compute the distributions along the same path (the same
schedule, the recurrent / key-value-cached decoder, one thread), so the decoder sees bit-identical
probabilities; the file records the schedule, and a CRC of the codes catches a decode that diverges
anyway (a file decoded with other floating-point kernels than it was encoded with).

File format ``.sbz`` version 1 or 2 (little-endian)::

    offset  size  field
    0       4     magic b"SBZ\\x1a"
    4       1     format version: 1 (sequential schedule) or 2 (schedule in flags bit 1)
    5       1     flags: bit 0 = the input was registered to the model grid by SynthBrain;
                  bit 1 (version 2 only) = the wavefront schedule; other bits must be 0
    6       1     engine that computed the probabilities: 0 torch, 1 fast-transformers
    7       1     n = length of the model name
    8       n     model name (UTF-8)
    8+n     16    first 16 bytes of the SHA-256 of the model's weights (VQ-VAE + transformer)
    +16     6     image grid shape, 3 x uint16
    +6      3     code grid shape, 3 x uint8
    +3      48    affine of the volume, top three rows of the 4x4 (float32, row-major)
    +48     8     intensity scaling: scale, offset (float32); voxel = decoded * scale + offset
    +8      4     CRC-32 of the code indices (uint16, raster order)
    +4      4     payload length P in bytes (uint32)
    +4      P     payload: the range coder's 32-bit words (uint32)
    +P      4     CRC-32 of every byte before it

Writers use version 1 for the sequential schedule (the same bytes as before the wavefront
existed, so older readers still read them) and version 2 for the wavefront, which older readers
refuse by its version. Readers take both; any other version is refused.

Every decompressed volume is a lossy reconstruction, written with a JSON sidecar that says so,
that it is not for clinical use, and which model and file it came from.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAGIC", "FORMAT_VERSION", "READ_VERSIONS", "CodecError", "SbzHeader", "compress", "decompress", "read_header",
           "compress_file", "decompress_file", "code_probabilities", "symbol_order"]

MAGIC = b"SBZ\x1a"
FORMAT_VERSION = 2  # the newest version written; 1 is still written (and read) for the sequential schedule
READ_VERSIONS = (1, 2)
_WAVEFRONT = 2  # flags bit 1
_ENGINE_IDS = {"torch": 0, "fast-transformers": 1}
_FIXED = struct.Struct("<16s3H3B12f2fII")  # hash, grid, code grid, affine rows, scale/offset, code CRC, payload length
GRID_TOLERANCE_MM = 0.01


class CodecError(ValueError):
    """A file that is not a valid ``.sbz`` for this model, or input the codec cannot take."""


@dataclass
class SbzHeader:
    """The header fields of a ``.sbz`` file (see the module docstring)."""

    model: str
    weights_hash: bytes
    engine: str
    registered: bool
    grid_shape: tuple[int, int, int]
    code_shape: tuple[int, int, int]
    affine: np.ndarray
    scale: float
    offset: float
    codes_crc: int
    payload: bytes
    schedule: str = "sequential"
    version: int = 1


def _token_crc(codes: np.ndarray) -> int:
    return zlib.crc32(np.asarray(codes, "<u2").tobytes())


def _pack(h: SbzHeader) -> bytes:
    name = h.model.encode("utf-8")
    if len(name) > 255:
        raise CodecError(f"model name is too long for the format ({len(name)} bytes, at most 255)")
    flags = (1 if h.registered else 0) | (_WAVEFRONT if h.schedule == "wavefront" else 0)
    version = 2 if h.schedule == "wavefront" else 1
    body = MAGIC + bytes([version, flags, _ENGINE_IDS[h.engine], len(name)]) + name
    body += _FIXED.pack(h.weights_hash[:16], *h.grid_shape, *h.code_shape, *np.asarray(h.affine, np.float32)[:3].ravel(),
                        h.scale, h.offset, h.codes_crc, len(h.payload))
    body += h.payload
    return body + struct.pack("<I", zlib.crc32(body))


def read_header(data: bytes, source: str = "input") -> SbzHeader:
    """Parse and check a ``.sbz`` file's bytes (magic, version, lengths, checksum).

    Raises:
        CodecError: not an ``.sbz`` file, another format version, truncated or damaged.
    """
    if len(data) < 8 or data[:4] != MAGIC:
        raise CodecError(f"{source} is not a SynthBrain .sbz file (bad magic)")
    if data[4] not in READ_VERSIONS:
        raise CodecError(f"{source} is .sbz format version {data[4]}; this SynthBrain reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}")
    n = data[7]
    fixed_end = 8 + n + _FIXED.size
    if len(data) < fixed_end + 4:
        raise CodecError(f"{source} is truncated ({len(data)} bytes)")
    (digest, gx, gy, gz, cx, cy, cz, *rest) = _FIXED.unpack_from(data, 8 + n)
    affine_rows, (scale, offset, codes_crc, plen) = rest[:12], rest[12:]
    if len(data) != fixed_end + plen + 4:
        raise CodecError(f"{source} is truncated or has trailing bytes ({len(data)} bytes, header says {fixed_end + plen + 4})")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise CodecError(f"{source} is damaged (checksum mismatch)")
    known = 1 | (_WAVEFRONT if data[4] >= 2 else 0)
    if data[5] & ~known:
        raise CodecError(f"{source} is damaged (unknown flags {data[5]:#04x} for format version {data[4]})")
    engines = {v: k for k, v in _ENGINE_IDS.items()}
    if data[6] not in engines:
        raise CodecError(f"{source} names an unknown engine id {data[6]}")
    try:
        model = data[8:8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{source} is damaged (model name is not UTF-8)") from None
    affine = np.eye(4)
    affine[:3] = np.asarray(affine_rows, np.float64).reshape(3, 4)
    return SbzHeader(model, digest, engines[data[6]], bool(data[5] & 1), (gx, gy, gz), (cx, cy, cz), affine,
                     float(scale), float(offset), codes_crc, bytes(data[fixed_end:fixed_end + plen]),
                     "wavefront" if data[5] & _WAVEFRONT else "sequential", data[4])


def symbol_order(transformer, schedule: str) -> np.ndarray:
    """Raster positions in the order the ``schedule`` codes them (the range coder's symbol order)."""
    if schedule == "wavefront":
        from .vq.transformer import wavefront_order

        return wavefront_order(transformer.seq_len, transformer.config["window"]).numpy()
    return np.arange(transformer.seq_len)


def code_probabilities(transformer, codes: np.ndarray | None, cond, *, on_symbol=None,
                       schedule: str | None = None) -> np.ndarray | None:
    """Walk the decoder over the sequence on one thread and return float64 probabilities.

    With ``codes`` (raster order; encoding), returns the (L, K) probabilities of every position
    (raster order). Without (decoding), ``on_symbol(i, probs)`` must return the code at raster
    position ``i`` from its (K,) probabilities, and is called in the schedule's order
    (:func:`symbol_order`); returns ``None``. ``schedule``: ``sequential`` or ``wavefront``
    (``None``: the transformer's own).
    """
    import torch

    from .vq.sampler import torch_threads

    schedule = transformer.schedule if schedule is None else schedule
    if schedule == "wavefront" and transformer.schedule != "wavefront":
        why = ("this model has no `wavefront` flag" if not transformer.config.get("wavefront") else
               f"the {transformer.engine} engine cannot run it for {transformer.config['attention']} attention "
               "(use --engine torch)")
        raise CodecError(f"coded with the wavefront schedule, but {why}")
    device = transformer.head.weight.device
    n = transformer.seq_len
    out = np.empty((n, transformer.config["num_tokens"]), np.float64) if codes is not None else None
    with torch_threads(1), torch.no_grad():
        if schedule == "wavefront":
            dec = transformer.wavefront_decoder(cond.to(device))
            prev = None
            for _ in range(dec.steps):
                pos, logits = dec.step(prev)
                p = torch.softmax(logits[:, 0].float().cpu().double(), dim=-1).numpy()
                where = pos.cpu().numpy()
                if out is not None:
                    out[where] = p
                    syms = codes[where]
                else:
                    syms = [int(on_symbol(int(i), pi)) for i, pi in zip(where, p)]
                prev = torch.as_tensor(np.asarray(syms, np.int64), device=device)[:, None]
            return out
        dec = transformer.decoder(cond.to(device))
        prev = None
        for i in range(n):
            logits = dec.step(prev)[0].float().cpu().double()
            p = torch.softmax(logits, dim=-1).numpy()
            sym = int(codes[i]) if codes is not None else int(on_symbol(i, p))
            if out is not None:
                out[i] = p
            prev = torch.tensor([sym], device=device)
    return out


def _intensity_scaling(image: np.ndarray) -> tuple[float, float]:
    """(scale, offset) mapping the volume to [0, 1] like the prepared training data: the offset is
    the minimum when negative (else 0) and the 99.5th percentile of the voxels above it maps to 1."""
    finite = image[np.isfinite(image)]
    offset = float(min(0.0, finite.min())) if finite.size else 0.0
    above = finite[finite > offset]
    scale = float(np.percentile(above, 99.5) - offset) if above.size else 1.0
    return (scale if scale > 0 else 1.0), offset


def compress(image: np.ndarray, affine: np.ndarray, generator, *, registered: bool = False) -> bytes:
    """Compress an (X, Y, Z) volume on the model's grid to ``.sbz`` bytes.

    Args:
        image: Intensities (any range; mapped to [0, 1] by :func:`_intensity_scaling`, stored).
        affine: Its 4x4 voxel -> world affine (stored; the volume is assumed to be on the model grid).
        generator: A :class:`synth.vq.generator.VQBrainGenerator`.
        registered: Whether SynthBrain registered the input to the grid (recorded in the flags).
    """
    import constriction

    image = np.asarray(image, np.float32)
    grid = tuple(generator.grid.shape) if generator.grid else image.shape
    if image.shape != grid:
        raise CodecError(f"expected a volume of the model grid's shape {grid}, got {image.shape}")
    scale, offset = _intensity_scaling(image)
    x = np.clip((np.nan_to_num(image) - offset) / scale, 0.0, 1.0)
    codes = generator.encode_image(x).flatten().numpy()
    schedule = generator.transformer.schedule
    probs = code_probabilities(generator.transformer, codes, generator.null_condition(), schedule=schedule)
    order = symbol_order(generator.transformer, schedule)
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(codes[order].astype(np.int32), constriction.stream.model.Categorical(perfect=False), probs[order])
    payload = enc.get_compressed().astype("<u4").tobytes()
    header = SbzHeader(generator.config.name, bytes.fromhex(generator.weights_hash)[:16], generator.engine, registered,
                       grid, tuple(generator.code_shape()), np.asarray(affine, np.float64), scale, offset,
                       _token_crc(codes), payload, schedule, 2 if schedule == "wavefront" else 1)
    return _pack(header)


def decompress(data: bytes, generator, source: str = "input") -> tuple[np.ndarray, np.ndarray, SbzHeader]:
    """Decode ``.sbz`` bytes with ``generator`` (the model that wrote them): ``(image, affine, header)``.

    Raises:
        CodecError: damaged, truncated or foreign file, other model weights, or a decode that diverged.
    """
    import constriction
    import torch

    h = read_header(data, source)
    if h.model != generator.config.name or h.weights_hash != bytes.fromhex(generator.weights_hash)[:16]:
        raise CodecError(f"{source} was written by model {h.model} (weights {h.weights_hash.hex()[:12]}); the loaded model is "
                         f"{generator.config.name} (weights {generator.weights_hash[:12]}): decompress with the same model")
    if h.code_shape != tuple(generator.code_shape()) or h.grid_shape != tuple(generator.grid.shape):
        raise CodecError(f"{source} has grid {h.grid_shape} / codes {h.code_shape}, the model {generator.grid.shape} / {generator.code_shape()}")
    if len(h.payload) % 4:
        raise CodecError(f"{source} is damaged (payload is not whole 32-bit words)")
    words = np.frombuffer(h.payload, "<u4").astype(np.uint32)
    dec = constriction.stream.queue.RangeDecoder(words)
    family = constriction.stream.model.Categorical(perfect=False)
    codes = np.empty(generator.transformer.seq_len, np.int64)

    def next_symbol(i: int, p: np.ndarray) -> int:
        codes[i] = int(dec.decode(family, p[None])[0])
        return codes[i]

    code_probabilities(generator.transformer, None, generator.null_condition(), on_symbol=next_symbol, schedule=h.schedule)
    if _token_crc(codes) != h.codes_crc:
        raise CodecError(f"{source}: decoding diverged from encoding (codes checksum mismatch); it was encoded with the "
                         f"{h.engine} engine, this run uses {generator.engine}, and float kernels must match exactly")
    image = generator.decode_codes(torch.from_numpy(codes).view(h.code_shape)) * np.float32(h.scale) + np.float32(h.offset)
    return image.astype(np.float32), h.affine, h


# -- files ------------------------------------------------------------------------------------------
def _on_grid(affine: np.ndarray, shape: tuple[int, ...], grid) -> bool:
    return tuple(shape) == tuple(grid.shape) and np.allclose(affine, grid.affine, atol=GRID_TOLERANCE_MM)


def _load_on_grid(path: Path, generator, register: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """The input volume on the model grid: as it is, or (``register``) affinely registered to MNI152
    and brain-masked by :func:`synth.data.register.register_scan`."""
    from .io import load_nifti

    image, affine = load_nifti(path)
    image = np.asarray(image, np.float32)
    grid = generator.grid
    if _on_grid(affine, image.shape, grid):
        return image, affine, False
    if not register:
        raise CodecError(
            f"{path.name} is not on the model grid: expected shape {tuple(grid.shape)} with the {grid.spacing:g} mm MNI152 "
            f"affine of the model (origin {tuple(grid.origin)}), got shape {image.shape}; use --register to register it")
    import nibabel as nib

    from .data.register import register_scan

    reg = register_scan(nib.load(str(path)), grid=grid)
    return reg.image, grid.affine, True


def compress_file(src: str | Path, dst: str | Path, generator, *, force: bool = False, register: bool = False) -> dict[str, Any]:
    """``src`` NIfTI -> ``dst`` ``.sbz`` (atomic). Returns sizes and seconds.

    Args:
        register: Register an input that is not on the model grid (affine to MNI152, brain mask;
            :mod:`synth.data.register`) instead of refusing it. The file then holds the registered,
            skull-stripped volume on the model grid, and its flags say so.
    """
    from .io import atomic_path

    src, dst = Path(src), Path(dst)
    if not str(dst).endswith(".sbz"):
        raise CodecError(f"expected an output path ending in .sbz, got {str(dst)!r}")
    if dst.exists() and not force:
        raise CodecError(f"refusing to overwrite {dst} (use --force)")
    t0 = time.perf_counter()
    image, affine, registered = _load_on_grid(src, generator, register)
    data = compress(image, affine, generator, registered=registered)
    seconds = time.perf_counter() - t0
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    voxels = int(np.prod(image.shape))
    return {"bytes": len(data), "input_bytes": src.stat().st_size, "percent_of_uint8_voxels": 100.0 * len(data) / voxels,
            "seconds": seconds, "engine": generator.engine, "registered": registered}


def decompress_file(src: str | Path, dst: str | Path, generator, *, force: bool = False) -> dict[str, Any]:
    """``src`` ``.sbz`` -> ``dst`` NIfTI + JSON sidecar (both atomic; nothing written on error)."""
    from .brain import sidecar_path
    from .io import SYNTHETIC_NOTICE, nifti_suffix, save_nifti, write_json

    src, dst = Path(src), Path(dst)
    nifti_suffix(dst)
    side = sidecar_path(dst)
    for p in (dst, side):
        if p.exists() and not force:
            raise CodecError(f"refusing to overwrite {p} (use --force)")
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    t0 = time.perf_counter()
    image, affine, h = decompress(src.read_bytes(), generator, source=src.name)
    seconds = time.perf_counter() - t0
    details = {"input": src.name, "model": h.model, "weights_sha256_16": h.weights_hash.hex(), "engine": generator.engine,
               "bytes": src.stat().st_size, "registered_to_model_grid": h.registered}
    try:
        from . import provenance

        prov = provenance.extend({}, "decompress", **details)
        prov["description"] = "lossy reconstruction by the SynthBrain neural codec (VQ-VAE + transformer)"
        desc = provenance.descrip(prov, "codec reconstruction")
    except ImportError:  # older trees without synth.provenance
        prov = {"notice": SYNTHETIC_NOTICE, "synthetic": False, "history": [{"command": "decompress", **details}]}
        desc = "SYNTHETIC not for clinical use; SynthBrain codec reconstruction"
    prov["codec"] = {"format": f"sbz v{h.version}", "schedule": h.schedule, **details}
    save_nifti(dst, image, affine, descrip=desc)
    try:
        write_json(side, prov)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return {"seconds": seconds, "sidecar": str(side), "engine": generator.engine}
