"""What the viewer asks of ``synth``, without Streamlit: requests, the device queue, anatomy, exports.

Everything here uses ``synth``'s public API only (``synth.*`` and ``synth.anatomy``) and is
testable without a browser. ``viewer/app.py`` draws widgets around it.
"""

from __future__ import annotations

import importlib
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import synth

__all__ = [
    "DISEASE_LINE",
    "DeviceQueue",
    "Generated",
    "ModelChoice",
    "Request",
    "anatomy",
    "anatomy_error",
    "anatomy_missing",
    "brain_meshes",
    "default_model",
    "export_files",
    "GLOSSARY",
    "conditioned_keys",
    "dseg_tsv",
    "freesurfer_lut",
    "label_colors",
    "slicer_ctbl",
    "target_check",
    "morphometry_rows",
    "normative_curves",
    "parse_request",
    "prepare_scan",
    "read_upload",
    "scan_rows",
    "generator_models",
    "model_choices",
    "run_generation",
    "segment_result",
    "sampling_caption",
    "settle_heap",
    "structure_rows",
]

DISEASE_LINE = (
    "The model was trained on healthy adults (IXI). MCI and AD are expressed through morphometry: "
    "the conditioned volumes (hippocampus, ventricles, brain, grey matter) are shifted by effect "
    "sizes from the literature, not learned from patients' scans."
)


GLOSSARY = """
**CN, MCI, AD.** CN: cognitively normal (healthy). MCI: mild cognitive impairment. AD: Alzheimer's disease.
SynthBrain was trained on healthy volunteers only (IXI). A normative model of the training brains gives the
volumes a healthy brain of that age and sex is expected to have; MCI and AD **shrink the hippocampus by 12 % and
24 %** (Shi et al. 2009, *Hippocampus* 19:1055), enlarge the ventricles and shrink the whole brain by approximate
literature effects, and the generator is asked for those volumes. So an "AD" brain here has the morphometry of
AD, not patterns learned from patients' scans.

**Units and abbreviations.** % ICV: percent of the intracranial volume (everything inside the skull: brain and
CSF), which removes head size. GM: grey matter (cortex and deep grey nuclei). WM: white matter. Brain: GM + WM.
Lateral ventricles: the two large CSF cavities (they grow with age and in AD). z: how many standard deviations a
volume lies from the healthy expected value for that age and sex (|z| > 1.96: outside the healthy 95 % range).
Requested: the volume the generator was asked for. Measured: what the shipped segmenter finds in the generated
brain (its own error on real scans is a few percent). T1 intensity: 0-1, arbitrary units, scaled per brain.
"""


# -- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One generation: everything that determines the brain (and is the cache key).

    Attributes:
        model: Model name (a folder of ``synth``'s models directory).
        condition: Validated condition.
        seed: Seed of the sampler's noise.
        steps: DDIM steps, or ``None`` for the model's default.
        guidance: Classifier-free guidance scale, or ``None`` for the model's default.
        warnings: Messages raised while validating (e.g. age outside the training range).
        precision: ``fp32`` or ``bf16``, or ``None`` for the model's ``auto`` choice.
        speed: ``standard`` (the model's default sampling) or ``fast`` (its fast preset, e.g.
            DPM-Solver++(2M) in 8 steps; only models that have one, see :attr:`ModelChoice.has_fast`).
        match_volumes: Warp the brain to its requested ventricle and hippocampus volumes after
            sampling (``synth.anatomy.match_brain_volumes``; needs the segmenter).
        refine: Apply (``True``) or leave out (``False``) the model's refiner, or ``None`` for the
            model's default (see :attr:`ModelChoice.has_refiner`).
    """

    model: str
    condition: synth.Condition
    seed: int
    steps: int | None = None
    guidance: float | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    precision: str | None = None
    speed: str = "standard"
    match_volumes: bool = False
    refine: bool | None = None

    def key(self) -> tuple:
        """Plain, hashable values for ``st.cache_data`` and the out-of-date check (precision last)."""
        c = self.condition
        return (self.model, c.age, c.sex, c.diagnosis, tuple(sorted(c.volumes.items())), self.seed, self.steps, self.guidance,
                self.speed, self.match_volumes, self.refine, self.precision)

    def with_condition(self, **changes: Any) -> "Request":
        """The same request with some condition fields changed (validated again)."""
        d = self.condition.to_dict()
        d.update(changes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cond = synth.Condition.from_dict(d)
        return Request(self.model, cond, self.seed, self.steps, self.guidance, tuple(str(w.message) for w in caught),
                       precision=self.precision, speed=self.speed, match_volumes=self.match_volumes, refine=self.refine)


def parse_request(
    *,
    model: str | None,
    age: Any,
    sex: Any,
    diagnosis: Any,
    seed: Any,
    volumes: Mapping[str, Any] | None = None,
    steps: Any = None,
    guidance: Any = None,
    models: Sequence[str] | None = None,
    precision: Any = None,
    speed: Any = None,
    match_volumes: Any = False,
    refine: Any = None,
) -> Request:
    """Validate what the widgets hold; raise ``ValueError``/``TypeError`` whose message the user can act on.

    Args:
        model: Chosen model name; must be one of ``models`` (default :func:`synth.available_models`).
        age, sex, diagnosis, volumes: As :class:`synth.Condition`.
        seed: Non-negative integer.
        steps: Positive integer or ``None`` (model default).
        guidance: 0-20 or ``None`` (model default).
        precision: ``auto`` or ``None`` (the model's choice: bf16 only where it is faster than float32, a
            GPU with bf16 or a CPU with AMX; :func:`synth.runtime.bf16_faster`), ``fp32`` or ``bf16``.
        speed: ``standard`` or ``None`` (the model's default sampling, as the library's), or ``fast``
            (the model's fast preset; refused at generation by a model without one).
        match_volumes: ``True`` to warp the brain to its requested volumes after sampling.
        refine: ``True``/``False`` to apply/leave out the model's refiner, ``None`` for its default.
    """
    models = list(generator_models() if models is None else models)
    if not models:
        raise ValueError(
            "no model found: set SYNTHBRAIN_MODELS to a folder of models, or install the shipped "
            f"model into assets/models/{synth.DEFAULT_MODEL}"
        )
    if model not in models:
        raise ValueError(f"`model` must be one of {', '.join(models)}, got {model!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, float)) or float(seed) != int(seed) or int(seed) < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
    if int(seed) >= 2**53:
        raise ValueError(f"`seed` must be below 2^53, got {seed!r}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer, float)) or float(steps) != int(steps):
            raise ValueError(f"`steps` must be a whole number of sampling steps, got {steps!r}")
        if not 1 <= int(steps) <= 1000:
            raise ValueError(f"`steps` must be within 1-1000, got {steps}")
        steps = int(steps)
    if guidance is not None:
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise ValueError(f"`guidance scale` must be a number, got {guidance!r}") from None
        if not 0.0 <= guidance <= 20.0:
            raise ValueError(f"`guidance scale` must be within 0-20, got {guidance:g}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        condition = synth.Condition(age=age, sex=sex, diagnosis=diagnosis, volumes=dict(volumes or {}))
    if precision is not None and str(precision).lower() not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    precision = None if precision is None or str(precision).lower() == "auto" else str(precision).lower()
    if speed is None:
        speed = "standard"
    if not isinstance(speed, str) or speed.strip().lower() not in SPEEDS:
        raise ValueError(f"`speed` must be one of {', '.join(SPEEDS)}, got {speed!r}")
    if not isinstance(match_volumes, (bool, np.bool_)):
        raise TypeError(f"`match_volumes` must be True or False, got {match_volumes!r}")
    if refine is not None and not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"`refine` must be True, False or None, got {refine!r}")
    return Request(str(model), condition, int(seed), steps, guidance, tuple(str(w.message) for w in caught),
                   precision=precision, speed=speed.strip().lower(), match_volumes=bool(match_volumes),
                   refine=None if refine is None else bool(refine))


PRECISIONS = ("auto", "fp32", "bf16")
REFINER_CHOICES = {"auto": None, "on": True, "off": False}  # the viewer's Refiner box -> Request.refine
SPEEDS = ("fast", "standard")
SPEED_LABELS = {"fast": "Fast preview", "standard": "Standard"}
BACKEND_LABELS = {"ldm": "latent diffusion", "vq": "VQ-VAE + transformer"}
SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)"}  # as synth.pipeline writes them in provenance


def takes(generator, option: str) -> bool:
    """Whether ``generator.generate`` (an instance's or a class's) names ``option`` as an argument.

    A catch-all ``**kwargs`` does not count: the VQ backend accepts and ignores other backends'
    options, and the viewer must not let a control do nothing in silence.
    """
    import inspect

    try:
        p = inspect.signature(generator.generate).parameters.get(option)
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def takes_precision(generator) -> bool:
    """Whether ``generator.generate`` has a ``precision`` argument (newer ``synth``, the ``ldm`` backend)."""
    return takes(generator, "precision")


def has_fast_preset(generator) -> bool:
    """Whether ``generator`` takes ``fast=`` and its model config has a ``fast`` sampling preset."""
    sampling = getattr(getattr(generator, "config", None), "sampling", None) or {}
    return takes(generator, "fast") and isinstance(sampling.get("fast"), dict)


@dataclass(frozen=True)
class ModelChoice:
    """A generator the viewer offers, and which controls apply to it (read without loading weights).

    Attributes:
        name: Model folder name.
        backend: ``ldm`` or ``vq`` (:data:`synth.generators.BACKENDS`).
        version: The model's version.
        options: The request fields its ``generate`` takes: some of ``steps``, ``guidance``,
            ``precision``, ``speed`` (``speed`` only with a ``fast`` preset in its config).
        sampling: Its config's ``sampling`` section (defaults and the ``fast`` preset).
        refiner: Its config's ``refiner`` section, or ``None`` when it has no refiner.
    """

    name: str
    backend: str
    version: str = ""
    options: frozenset = frozenset()
    sampling: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    refiner: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def has_refiner(self) -> bool:
        """Whether the Refiner switch applies (the model ships a refiner after its decoder)."""
        return bool(self.refiner)

    @property
    def refiner_default(self) -> bool:
        """Whether the model applies its refiner unless switched off."""
        return self.has_refiner and bool(self.refiner.get("default", True))

    @property
    def label(self) -> str:
        """``name · backend`` for the model selectbox."""
        return f"{self.name} · {BACKEND_LABELS.get(self.backend, self.backend)}"

    @property
    def has_fast(self) -> bool:
        """Whether the Speed choice applies (an ``ldm`` model whose config has a ``fast`` preset)."""
        return "speed" in self.options

    def sampling_plan(self, speed: str = "standard", steps: int | None = None) -> str:
        """What a generation with ``speed`` and ``steps`` will run, in words (e.g. ``DPM-Solver++(2M), 8 steps``).

        Follows :meth:`synth.pipeline.BrainGenerator.sampling_options`: the ``fast`` preset over the
        config's defaults; explicit ``steps`` replace the preset's count and keep its sampler.
        """
        if "steps" not in self.options:
            return "autoregressive over the code grid" if self.backend == "vq" else "the model's own sampler"
        cfg = {k: v for k, v in self.sampling.items() if k != "fast"}
        if speed == "fast" and self.has_fast:
            cfg.update(self.sampling["fast"])
        sampler = SAMPLER_NAMES.get(str(cfg.get("sampler", "ddim")), str(cfg.get("sampler")))
        preset = int(cfg.get("steps", 20))
        if steps is None or int(steps) == preset:
            return f"{sampler}, {preset} steps"
        return f"{sampler}, {int(steps)} steps (from Sampling steps; this Speed alone runs {preset})"


_OPTION_ARGS = {"steps": "steps", "guidance": "guidance_scale", "precision": "precision", "speed": "fast"}


def model_choices() -> dict[str, ModelChoice]:
    """The generator models of :func:`synth.available_models` (every backend; segmenters and other
    folders excluded), by name, with the controls that apply to each."""
    import json

    from synth.generators import backend_class

    out = {}
    for info in synth.available_models(details=True):
        try:
            cfg = json.loads((Path(info.path) / "config.json").read_text())
            cls = backend_class(info.backend)
        except (OSError, ValueError, ImportError) as exc:  # unreadable or a backend not installed: not offered
            warnings.warn(f"model {info.name} is not offered: {exc}", stacklevel=2)
            continue
        sampling = cfg.get("sampling") if isinstance(cfg.get("sampling"), dict) else {}
        options = {o for o, arg in _OPTION_ARGS.items() if takes(cls, arg)}
        if not isinstance(sampling.get("fast"), dict):
            options.discard("speed")
        refiner = cfg.get("refiner") if isinstance(cfg.get("refiner"), dict) else None
        out[info.name] = ModelChoice(info.name, info.backend, info.version, frozenset(options), sampling, refiner)
    return out


def generator_models() -> list[str]:
    """The names of :func:`model_choices`: generators of every backend, not the segmenter or other
    folders that live in the same models folder."""
    return list(model_choices())


def default_model(models: Sequence[str]) -> str | None:
    """``synth.DEFAULT_MODEL`` when present, else the first available model, else ``None``."""
    if synth.DEFAULT_MODEL in models:
        return synth.DEFAULT_MODEL
    return models[0] if models else None


# -- generation ---------------------------------------------------------------------------
@dataclass
class Generated:
    """A generated brain with its segmentation (``None`` without anatomy) and timings in seconds."""

    brain: synth.SyntheticBrain
    labels: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""


def run_generation(
    generator: synth.BrainGenerator,
    request: Request,
    *,
    progress: Callable[[int, int], None] | None = None,
    segmenter=None,
) -> Generated:
    """Generate ``request`` with ``generator`` and, when ``segmenter`` is given, segment it."""
    import time

    extra = _generate_options(generator, request)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the request already reported them
        brain = generator.generate(request.condition, request.seed, progress=progress, **extra)
    result = Generated(brain, seconds={"generate": time.perf_counter() - t})
    return segment_result(result, segmenter) if segmenter is not None else result


def segment_result(result: Generated, segmenter) -> Generated:
    """``result`` with its labels from ``segmenter`` (and the time taken); a failure becomes ``note``, never an error."""
    import time

    t = time.perf_counter()
    labels, note = None, ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels = _segment(segmenter, result.brain)
        note = "; ".join(dict.fromkeys(str(w.message) for w in caught))
        if labels.shape != result.brain.image.shape:
            raise ValueError(f"segmentation shape {labels.shape} differs from the image's {result.brain.image.shape}")
        if labels.min(initial=0) >= 0 and labels.max(initial=0) < 256:
            labels = labels.astype(np.uint8)
    except Exception as exc:  # a failed segmentation must not lose the brain
        labels, note = None, f"segmentation failed: {type(exc).__name__}: {exc}"
    seconds = {**result.seconds, "segment": time.perf_counter() - t}
    return Generated(result.brain, labels, seconds, result.note or note)


def _generate_options(generator, request: Request) -> dict[str, Any]:
    """``generate``'s keyword arguments for ``request``; refuses an option the generator would not use."""
    backend = getattr(generator, "backend", "")
    what = f"model {request.model!r}" + (f" ({BACKEND_LABELS[backend]})" if backend in BACKEND_LABELS else "")
    extra: dict[str, Any] = {}
    if request.steps is not None:
        if not takes(generator, "steps"):
            raise ValueError(f"{what} has no sampling steps: leave Sampling steps empty")
        extra["steps"] = request.steps
    if request.guidance is not None:
        if not takes(generator, "guidance_scale"):
            raise ValueError(f"{what} has no guidance scale: leave Guidance scale empty")
        extra["guidance_scale"] = request.guidance
    if request.precision is not None:
        if not takes_precision(generator):
            raise ValueError(f"{what} has no precision option: leave precision on auto")
        extra["precision"] = request.precision
    if request.speed == "fast":
        if not has_fast_preset(generator):
            raise ValueError(f"{what} has no fast sampling preset: choose Standard speed")
        extra["fast"] = True
    if request.refine is not None and getattr(generator, "refiner", None) is not None:
        extra["refine"] = request.refine
    elif request.refine:
        raise ValueError(f"{what} has no refiner: switch Refiner off")
    return extra


def refines_after_showing(generator, request: Request) -> bool:
    """Whether the page shows ``request``'s brain at once and its refined texture a moment later: the Fast
    preview with the Refiner on auto, for a model that refines its standard sampling but leaves the refiner
    out of its fast preset (the shipped default: it would add about 1.3 s to a 2 s brain on 2 CPU cores
    without native bf16, benchmarks/bench_generate.py)."""
    return (request.refine is None and request.speed == "fast" and getattr(generator, "refiner", None) is not None
            and generator.refines_by_default_for(fast=False) and not generator.refines_by_default_for(fast=True))


def refine_result(generator, result: Generated) -> Generated:
    """``result``'s brain through its model's refiner (``generator.refine_brain``: the brain ``refine=True``
    gives), without labels (they are the unrefined brain's), the refiner's seconds added."""
    import time

    t = time.perf_counter()
    brain = generator.refine_brain(result.brain)
    return Generated(brain, None, {**result.seconds, "refine": time.perf_counter() - t}, result.note)


def sampling_caption(provenance: Mapping[str, Any]) -> str:
    """How a brain was sampled, from its provenance: ``Fast preview · DPM-Solver++(2M), 8 steps · fp32 precision``."""
    parts = []
    preset = provenance.get("sampling_preset")
    if preset in SPEED_LABELS:
        parts.append(SPEED_LABELS[preset])
    sampler, steps = provenance.get("sampler"), provenance.get("steps")
    if sampler or steps:
        parts.append(", ".join(p for p in (sampler and str(sampler), steps and f"{steps} steps") if p))
    parts.append(f"{provenance.get('precision', 'default')} precision")
    refiner = provenance.get("refiner")
    if isinstance(refiner, dict):
        parts.append("refined" if refiner.get("applied") else "refiner off")
    if "volume_matching" in provenance:
        parts.append("volumes matched by a warp")
    return " · ".join(parts)


def _segment(segmenter, brain: synth.SyntheticBrain) -> np.ndarray:
    if hasattr(segmenter, "segment_volume"):  # any grid: resampled to the segmenter's and back
        return np.asarray(segmenter.segment_volume(brain.image, brain.affine, source="the generated brain")[0])
    return np.asarray(segmenter.segment(brain.image))


# -- one generation at a time per device ------------------------------------------------------
class DeviceQueue:
    """A first-come, first-served line per device, so that sessions queue their generations instead
    of exhausting memory, and each can tell its user where it stands.

    Shared by all sessions (the app keeps one in ``st.cache_resource``). ``waiting(device)`` counts
    the generations queued or running there.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lines: dict[str, list[object]] = {}

    def waiting(self, device: str) -> int:
        with self._cond:
            return len(self._lines.get(str(device), ()))

    @contextmanager
    def slot(
        self, device: str, timeout: float | None = None, on_wait: Callable[[int], None] | None = None
    ) -> Iterator[int]:
        """Hold ``device`` for one generation, in arrival order; yields how many were ahead when we queued.

        Args:
            device: The device's name (one line per device).
            timeout: Seconds to wait at most (``None``: no limit).
            on_wait: Called while waiting with the number of generations still ahead (1 = next),
                whenever that changes; called outside the queue's lock.

        Raises:
            TimeoutError: waited longer than ``timeout`` seconds.
        """
        import time

        device = str(device)
        ticket = object()
        with self._cond:
            line = self._lines.setdefault(device, [])
            line.append(ticket)
            ahead = len(line) - 1
        deadline = None if timeout is None else time.monotonic() + timeout
        told = None
        try:
            while True:
                with self._cond:
                    position = line.index(ticket)
                    if position == 0:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"{device} stayed busy for {timeout:g} s; try again in a moment")
                if on_wait is not None and position != told:
                    on_wait(position)
                    told = position
                with self._cond:
                    if line.index(ticket) != 0:
                        self._cond.wait(0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic())))
            yield ahead
        finally:
            with self._cond:
                line.remove(ticket)
                self._cond.notify_all()


# -- anatomy (synth.anatomy, optional until it lands) -----------------------------------------
def anatomy():
    """The ``synth.anatomy`` module, or ``None`` while it is not installed (re-checked on each call)."""
    try:
        return importlib.import_module("synth.anatomy")
    except ImportError:
        return None


def anatomy_error() -> str:
    """Why anatomy is unavailable, for the UI."""
    try:
        importlib.import_module("synth.anatomy")
    except ImportError as exc:
        return f"Anatomy not available (segmentation, surfaces, label and mesh exports): {exc}"
    return ""


def anatomy_missing(*names: str) -> str:
    """A message naming what ``synth.anatomy`` lacks among ``names``, or ``""`` when all are there."""
    anat = anatomy()
    if anat is None:
        return anatomy_error()
    missing = [n for n in names if not hasattr(anat, n)]
    return f"synth.anatomy does not provide {', '.join(missing)} yet" if missing else ""


def brain_meshes(labels: np.ndarray, affine: np.ndarray, **kwargs) -> dict[str, Any]:
    """``synth.anatomy.structure_meshes`` of the structures present in ``labels`` (absent ones are
    expected in a synthetic brain's label map, so their warnings are silenced)."""
    anat = anatomy()
    if anat is None:
        raise RuntimeError(anatomy_error())
    present = [int(v) for v in np.unique(labels) if v > 0]
    if not present:
        raise ValueError("the label map is empty: no structure to mesh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anat.structure_meshes(labels, affine, present, **kwargs)


def label_colors(structures) -> dict[int, tuple]:
    """``{label: rgb}`` of ``synth.anatomy.STRUCTURES``."""
    return {int(s.label): tuple(s.rgb) for s in structures}


# -- morphometry and normative curves ---------------------------------------------------------
def normative_curves(
    normative, sex: str, ages: Sequence[float] | None = None, keys: Sequence[str] = synth.VOLUME_KEYS
) -> dict[str, dict[str, np.ndarray]]:
    """Expected volume and 95 % range over ``ages`` for ``sex`` (fractions of ICV).

    Returns:
        ``{key: {"age", "expected", "low", "high"}}`` arrays of equal length.
    """
    ages = np.linspace(*synth.AGE_RANGE, 78) if ages is None else np.asarray(ages, float)
    out = {k: {"age": ages, "expected": [], "low": [], "high": []} for k in keys}
    for a in ages:
        exp, rng = normative.expected(float(a), sex), normative.interval(float(a), sex)
        for k in keys:
            out[k]["expected"].append(exp[k])
            out[k]["low"].append(rng[k][0])
            out[k]["high"].append(rng[k][1])
    return {k: {n: np.asarray(v, float) for n, v in d.items()} for k, d in out.items()}


def morphometry_rows(brain: synth.SyntheticBrain, normative=None, labels: np.ndarray | None = None) -> list[dict]:
    """One row per conditioned volume: requested, expected (healthy), normative range and measured.

    Measured values come from ``synth.anatomy.morphometry`` of ``labels``; without anatomy or
    labels they are ``None``. All values are fractions of ICV; ``z`` is the measured volume's
    normative z-score.
    """
    return scan_rows(labels, brain.condition, normative, brain.targets)


def scan_rows(
    labels: np.ndarray | None, condition: synth.Condition, normative=None, targets: Mapping[str, float] | None = None,
    voxel_volume_mm3: float = 8.0,
) -> list[dict]:
    """:func:`morphometry_rows` for any label map (e.g. a user's scan, ``targets`` empty)."""
    c = condition
    targets = dict(targets or {})
    expected = normative.expected(c.age, c.sex) if normative else {}
    interval = normative.interval(c.age, c.sex) if normative else {}
    measured = {}
    anat = anatomy()
    if anat is not None and labels is not None:
        for row in anat.morphometry(labels, condition=c, targets=targets, normative=normative, voxel_volume_mm3=voxel_volume_mm3):
            if row["name"] in synth.VOLUME_KEYS and np.isfinite(row["pct_icv"]):
                measured[row["name"]] = row["pct_icv"] / 100.0
    rows = []
    for key in synth.VOLUME_KEYS:
        value = measured.get(key)
        z = None
        if normative is not None and value:
            z = normative.zscore(key, float(value), c.age, c.sex)
        low, high = interval.get(key, (None, None))
        rows.append(
            {
                "volume": key,
                "requested": targets.get(key),
                "measured": value,
                "expected": expected.get(key),
                "low": low,
                "high": high,
                "z": z,
            }
        )
    return rows


# -- your own scan ------------------------------------------------------------------------------
MAX_UPLOAD_MB = 64


def read_upload(data: bytes, max_mb: float = MAX_UPLOAD_MB):
    """Parse uploaded bytes as a 3D NIfTI with nibabel only (``synth.io.load_nifti``'s checks).

    The bytes go to a fixed file name inside a fresh temporary folder (the user's file name is
    never used as a path) and are removed with it.

    Returns:
        A RAS+ ``nibabel.Nifti1Image`` held in memory.

    Raises:
        ValueError: too large, empty, or not a readable 3D NIfTI (the message says what was expected).
    """
    import nibabel as nib

    from synth.io import load_nifti

    size = len(data or b"")
    if size == 0:
        raise ValueError("the uploaded file is empty: expected a .nii or .nii.gz T1 scan")
    if size > max_mb * 1024 * 1024:
        raise ValueError(f"the uploaded file is {size / 1024 / 1024:.1f} MB: at most {max_mb:g} MB is accepted")
    name = "upload.nii.gz" if data[:2] == b"\x1f\x8b" else "upload.nii"
    with tempfile.TemporaryDirectory(prefix="synthbrain-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            array, affine = load_nifti(path)
        except ValueError as exc:
            raise ValueError(str(exc).replace(str(path), "the uploaded file")) from None
    array = np.asarray(array, np.float32)
    if not np.isfinite(array).all():
        raise ValueError("the uploaded scan holds NaN or infinite values: expected a T1 intensity volume")
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if zooms.min() < 0.2 or zooms.max() > 6.0:
        raise ValueError(f"the uploaded scan has voxels of {', '.join(f'{z:.2g}' for z in zooms)} mm: expected 0.2-6 mm (a brain MRI)")
    return nib.Nifti1Image(array, affine)


@dataclass
class PreparedScan:
    """A user's scan on the model grid, segmented and measured."""

    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray | None
    ncc: float
    notes: list[str]
    seconds: float


def prepare_scan(img, segmenter=None, threads: int | None = None) -> PreparedScan:
    """Register ``img`` to MNI152, mask its brain (``synth.data.register``) and segment it."""
    import time

    from synth.data.register import register_scan

    from synth.grid import MNI_2MM

    t = time.perf_counter()
    grid = getattr(segmenter, "grid", None) or MNI_2MM  # the segmenter's grid (the model grid when shipped)
    reg = register_scan(img, grid=grid, segmenter=segmenter, threads=threads)
    labels = None
    if segmenter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = np.asarray(segmenter.segment(reg.image)).astype(np.uint8)
        labels[~reg.mask] = 0
    return PreparedScan(reg.image, reg.affine, labels, reg.ncc, reg.notes, time.perf_counter() - t)


def conditioned_keys(generator) -> list[str]:
    """The volumes ``generator`` is conditioned on (its config's covariates that are volumes)."""
    covariates = getattr(getattr(generator, "config", None), "covariates", None) or ()
    return [k for k in synth.VOLUME_KEYS if k in covariates]


def target_check(
    rows: Sequence[Mapping], condition: synth.Condition, normative=None, keys: Sequence[str] | None = None,
    *, z_gap: float = 1.0, rel_gap: float = 0.15,
) -> list[dict]:
    """Measured against requested volume, per conditioned structure; flags a brain that missed its target.

    A volume is flagged when the measured value lies at least ``z_gap`` normative standard deviations
    from the requested one (with a normative model), else when it differs by more than ``rel_gap``
    (a fraction of the requested value).

    Args:
        rows: :func:`morphometry_rows` of the brain.
        condition: The brain's condition (age and sex for the z-scores).
        normative: The generator's normative model, or ``None``.
        keys: The conditioned volumes (:func:`conditioned_keys`); default every row with a request.

    Returns:
        One dict per checked volume: ``volume, requested, measured, gap_pct, z_requested, z_measured,
        z_gap, missed`` (fractions of ICV; ``None`` where not measured).
    """
    out = []
    for r in rows:
        k = r["volume"]
        req, meas = r.get("requested"), r.get("measured")
        if (keys is not None and k not in keys) or req is None:
            continue
        item = {"volume": k, "requested": float(req), "measured": None if meas is None else float(meas),
                "gap_pct": None, "z_requested": None, "z_measured": None, "z_gap": None, "missed": False}
        if meas is not None and req > 0 and meas > 0:
            item["gap_pct"] = 100.0 * (meas - req) / req
            if normative is not None:
                zr = normative.zscore(k, float(req), condition.age, condition.sex)
                zm = normative.zscore(k, float(meas), condition.age, condition.sex)
                item.update(z_requested=zr, z_measured=zm, z_gap=zm - zr, missed=abs(zm - zr) >= z_gap)
            else:
                item["missed"] = abs(meas - req) > rel_gap * req
        out.append(item)
    return out


def structure_rows(labels: np.ndarray, voxel_volume_mm3: float) -> list[dict]:
    """Per-structure volumes (mm^3, % of ICV) of ``labels`` via ``synth.anatomy.morphometry``."""
    anat = anatomy()
    if anat is None:
        raise RuntimeError(anatomy_error())
    return [
        {"structure": r["name"], "mm3": round(r["mm3"]), "% ICV": round(r["pct_icv"], 3)}
        for r in anat.morphometry(labels, voxel_volume_mm3=voxel_volume_mm3)
        if r["name"] not in synth.VOLUME_KEYS and r["name"] != "icv"
    ]


def morphometry_figure(rows: Sequence[Mapping], curves: Mapping[str, Mapping], age: float, sex: str):
    """A matplotlib figure: per volume, the normative curve and 95 % band over age, the requested
    volume and (when measured) the measured one at ``age``; a legend on every panel."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    keys = [r["volume"] for r in rows]
    ncol = min(3, len(keys))
    nrow = -(-len(keys) // ncol)
    fig = Figure(figsize=(4.6 * ncol, 3.7 * nrow), layout="constrained", dpi=110)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    titles = {"brain": "Brain (GM + WM)", "gm": "Grey matter (GM)", "wm": "White matter (WM)",
              "lateral_ventricles": "Lateral ventricles", "hippocampus": "Hippocampus"}
    for ax, row in zip(axes, rows):
        k = row["volume"]
        ax.axvspan(20, 82, color="0.92", zorder=-1, label="training ages")
        if k in curves:
            cv = curves[k]
            ax.fill_between(cv["age"], cv["low"] * 100, cv["high"] * 100, color="#9ecae1", alpha=0.6, label="healthy 95 % range")
            ax.plot(cv["age"], cv["expected"] * 100, color="#3182bd", lw=2, label="healthy expected")
        if row.get("requested") is not None:
            ax.plot([age], [row["requested"] * 100], "D", color="#e6550d", ms=9, label="requested")
        if row.get("measured") is not None:
            ax.plot([age], [row["measured"] * 100], "o", color="#31a354", ms=9, label="measured")
        ax.set_title(titles.get(k, k.replace("_", " ")), fontsize=13)
        ax.set_xlabel("age (years)", fontsize=11)
        ax.set_ylabel("% of intracranial volume", fontsize=11)
        ax.tick_params(labelsize=10)
        ax.legend(fontsize=9, loc="best", framealpha=0.85)
    for ax in axes[len(rows):]:
        ax.remove()
    fig.suptitle(f"Synthetic brain vs healthy normative volumes ({'female' if sex == 'F' else 'male'}, age {age:g})", fontsize=13)
    return fig


# -- exports ----------------------------------------------------------------------------------
EXPORT_FORMATS = ("nifti", "labels", "dseg", "lut", "ctbl", "json", "usd", "usdz", "stl", "glb")


def _stem(brain: synth.SyntheticBrain) -> str:
    c = brain.condition
    return f"synthbrain_age{c.age:g}_{c.sex}_{c.diagnosis}_seed{brain.seed}".replace(".", "p")


def export_files(
    brain: synth.SyntheticBrain,
    formats: Sequence[str] = ("nifti", "json"),
    *,
    labels: np.ndarray | None = None,
    meshes: Mapping[str, Any] | None = None,
    workdir: str | Path | None = None,
    target_checks: Sequence[Mapping] | None = None,
) -> dict[str, tuple[str, bytes, str]]:
    """Write ``brain`` in ``formats`` and return ``{format: (file_name, data, mime)}``.

    Every file carries the synthetic notice: the NIfTI ``descrip`` and JSON sidecar via
    ``SyntheticBrain.save``, labels and meshes via ``synth.anatomy``'s writers (metadata).
    ``dseg``, ``lut`` and ``ctbl`` are the labels' colour tables for other tools (BIDS
    ``dseg.tsv``, FreeSurfer LUT, 3D Slicer ``.ctbl``). ``target_checks`` (:func:`target_check`)
    goes into the JSON provenance and the labels' metadata as ``target_check``.

    Raises:
        ValueError: unknown format, or a label/mesh format without ``labels``/``meshes``.
        RuntimeError: a label/mesh format while ``synth.anatomy`` is not installed.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; supported: {', '.join(EXPORT_FORMATS)}")
    stem = _stem(brain)
    meta = brain.metadata()
    if target_checks is not None:
        meta["target_check"] = [dict(t) for t in target_checks]
    anat = anatomy()
    if labels is not None and anat is not None:
        meta["volumes_mm3"] = anat.measure_volumes(labels, voxel_volume_mm3=float(abs(np.linalg.det(brain.affine[:3, :3]))))
    out: dict[str, tuple[str, bytes, str]] = {}
    with tempfile.TemporaryDirectory(prefix="synthbrain-export-", dir=workdir) as tmp:
        tmp = Path(tmp)
        if "nifti" in formats or "json" in formats:
            nii = brain.save(tmp / f"{stem}_T1w.nii.gz")
            side = nii.with_name(f"{stem}_T1w.json")
            if "nifti" in formats:
                out["nifti"] = (nii.name, nii.read_bytes(), "application/gzip")
            if "json" in formats:
                data = side.read_bytes()
                if target_checks is not None:
                    import json

                    doc = json.loads(data)
                    doc["target_check"] = meta["target_check"]
                    data = (json.dumps(doc, indent=2) + "\n").encode()
                out["json"] = (f"{stem}_provenance.json", data, "application/json")
        tables = {"dseg": (dseg_tsv, f"{stem}_dseg.tsv", "text/tab-separated-values"),
                  "lut": (freesurfer_lut, f"{stem}_labels_LUT.txt", "text/plain"),
                  "ctbl": (slicer_ctbl, f"{stem}_labels.ctbl", "text/plain")}
        for fmt, (make, name, mime) in tables.items():
            if fmt in formats:
                if anat is None:
                    raise RuntimeError(anatomy_error())
                out[fmt] = (name, make(anat.STRUCTURES).encode(), mime)
        need_anat = [f for f in formats if f in ("labels", "usd", "usdz", "stl", "glb")]
        if need_anat:
            anat = anatomy()
            if anat is None:
                raise RuntimeError(anatomy_error())
            if "labels" in formats:
                if labels is None:
                    raise ValueError("label export needs a segmentation: generate with anatomy available")
                p = anat.save_labels(tmp / f"{stem}_labels.nii.gz", labels, brain.affine, meta) or tmp / f"{stem}_labels.nii.gz"
                out["labels"] = (Path(p).name, Path(p).read_bytes(), "application/gzip")
            mesh_formats = [f for f in need_anat if f not in ("labels",)]
            if mesh_formats and not meshes:
                raise ValueError("mesh exports need structure surfaces: generate with anatomy available")
            for fmt in mesh_formats:
                target = tmp / f"{stem}.{fmt}"
                if fmt in ("usd", "usdz"):
                    target = tmp / (f"{stem}.usdz" if fmt == "usdz" else f"{stem}.usdc")
                    p = anat.export_usd(target, meshes, meta) or target
                else:
                    p = anat.export_meshes(target, meshes, meta) or target
                mime = {"usdz": "model/vnd.usdz+zip", "stl": "model/stl", "glb": "model/gltf-binary"}.get(fmt, "application/octet-stream")
                out[fmt] = (Path(p).name, Path(p).read_bytes(), mime)
    return out


# -- label tables other tools read ---------------------------------------------------------------
def _rgb255(rgb) -> tuple[int, int, int]:
    c = np.asarray(rgb, float)[:3]
    if c.max(initial=0) <= 1.0:
        c = c * 255
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def dseg_tsv(structures) -> str:
    """A BIDS ``dseg.tsv`` (``index``, ``name``, ``abbreviation``, ``color``) for a labels NIfTI."""
    lines = ["index\tname\tabbreviation\tcolor", "0\tbackground\tBG\t#000000"]
    for s in structures:
        r, g, b = _rgb255(s.rgb)
        abbr = "".join(w[0] for w in str(s.name).replace("-", " ").split()).upper()
        lines.append(f"{int(s.label)}\t{s.name}\t{abbr}\t#{r:02x}{g:02x}{b:02x}")
    return "\n".join(lines) + "\n"


def freesurfer_lut(structures, notice: str = synth.SYNTHETIC_NOTICE) -> str:
    """A FreeSurfer colour table (``FreeSurferColorLUT.txt`` format: ``No. Label-Name R G B A``).

    3D Slicer opens it as a colour table too (load it, then pick it for the labels volume), as do
    freeview (``:colormap=lut:lut=FILE``) and ITK-SNAP.
    """
    lines = [f"# SynthBrain label table. {notice}", "#No. Label-Name                          R   G   B   A",
             f"{0:<4d} {'Unknown':<36s} {0:3d} {0:3d} {0:3d} {0:3d}"]
    for s in structures:
        r, g, b = _rgb255(s.rgb)
        lines.append(f"{int(s.label):<4d} {s.name:<36s} {r:3d} {g:3d} {b:3d} {0:3d}")
    return "\n".join(lines) + "\n"


def slicer_ctbl(structures, notice: str = synth.SYNTHETIC_NOTICE) -> str:
    """A 3D Slicer colour table (``.ctbl``: ``index name R G B A`` with A = 255 opaque)."""
    lines = [f"# SynthBrain label table. {notice}", "# Color table file for 3D Slicer", "0 Background 0 0 0 0"]
    for s in structures:
        r, g, b = _rgb255(s.rgb)
        lines.append(f"{int(s.label)} {s.name} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def settle_heap() -> int:
    """Collect garbage, then freeze what is left out of the cyclic collector's sight.

    With torch, MONAI, VTK and a model loaded the server holds ~500k long-lived objects; every
    full collection walks them all (150-300 ms on 2 busy cores), and Streamlit reruns trigger one
    every few slider moves. ``gc.freeze`` moves them to a permanent generation so the collector
    only scans what the reruns allocate. Call after imports and after loading a model.

    Returns:
        How many objects are frozen.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
