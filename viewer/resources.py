"""Shared resources of the viewer: models, the device queue, the cached generation, error guard.

Streamlit objects shared by every session (``st.cache_resource``: never mutate them) and the
brain cache (``st.cache_data``), keyed by models folder, model, condition, seed, steps, guidance,
speed and precision, and the label cache, keyed by the brain's pixels and the segmenter. Environment: ``SYNTHBRAIN_DEVICE`` (default ``auto``: GPU when present, else CPU),
``SYNTHBRAIN_SEGMENTER`` (default ``synthbrain-seg-2mm``), ``SYNTHBRAIN_VIEWER_CACHE`` (brains
kept, default 24, read at start).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import streamlit as st

import synth
from viewer import service

log = logging.getLogger("synthbrain.viewer")

ROOT = Path(__file__).resolve().parents[1]
MAX_BRAINS = int(os.environ.get("SYNTHBRAIN_VIEWER_CACHE", "24"))
TRAIN_AGES = (20.0, 82.0)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, TimeoutError)


def device_setting() -> str:
    """``SYNTHBRAIN_DEVICE`` or ``auto``."""
    return os.environ.get("SYNTHBRAIN_DEVICE", "auto")


def segmenter_name() -> str | None:
    """``SYNTHBRAIN_SEGMENTER`` or ``None`` (``synth.anatomy.DEFAULT_SEGMENTER``)."""
    return os.environ.get("SYNTHBRAIN_SEGMENTER") or None


def models_root() -> str:
    """The models folder in use (``SYNTHBRAIN_MODELS`` or ``assets/models``); part of every cache key."""
    from synth.pipeline import models_dir

    return str(models_dir().resolve())


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def get_generator(root: str, model: str, device: str | None = None) -> synth.Generator:  # either backend
    generator = synth.load_generator(Path(root) / model, device=device or device_setting())
    service.settle_heap()  # keep slider reruns free of long garbage collections
    return generator


@st.cache_resource
def device_queue() -> service.DeviceQueue:
    """One generation at a time per device, across sessions."""
    return service.DeviceQueue()


@st.cache_resource(show_spinner="Loading the segmenter…", max_entries=2)
def get_segmenter(root: str, name: str | None, device: str | None = None):
    anat = service.anatomy()
    if anat is None:
        return None
    name = name or anat.DEFAULT_SEGMENTER
    # The models folder first, then the shipped assets (SYNTHBRAIN_MODELS may hold only generators).
    folders = [p for p in (Path(root) / name, ROOT / "assets" / "models" / name) if p.is_dir()]
    segmenter = anat.load_segmenter(folders[0] if folders else name, device=device or device_setting())
    service.settle_heap()
    return segmenter


@st.cache_resource
def settle_once(stage: str) -> int:
    """Once per server and ``stage``: freeze long-lived objects (see ``service.settle_heap``)."""
    return service.settle_heap()


@st.cache_data(max_entries=MAX_BRAINS, show_spinner=False)
def generate_cached(
    root: str, model: str, age: float, sex: str, diagnosis: str, volumes: tuple, seed: int, steps, guidance,
    precision: str | None = None, speed: str = "standard", refine: bool | None = None, _progress=None,
) -> service.Generated:
    """The brain for one request, without labels (:func:`labels_cached` adds them); cached by model,
    condition, seed and sampling options (the refiner's switch included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parse_request already showed them
        request = service.Request(model, synth.Condition(age, sex, diagnosis, dict(volumes)), seed, steps, guidance,
                                  precision=precision, speed=speed, refine=refine)
    generator = get_generator(root, model)
    queue, where = device_queue(), str(generator.device)
    on_wait = None if _progress is None else _progress.queued
    with queue.slot(where, on_wait=on_wait):
        return service.run_generation(generator, request, progress=_progress)


@st.cache_data(max_entries=MAX_BRAINS, show_spinner=False)
def labels_cached(digest: str, root: str, segmenter: str | None, _result: service.Generated) -> tuple:
    """``(labels, note, seconds)`` of the brain whose pixels hash to ``digest``; cached apart from the
    brain so the page can show the brain before its labels (and keep one copy of the pixels)."""
    try:
        seg = get_segmenter(root, segmenter)
    except Exception as exc:  # keep the brain even if the segmenter cannot load
        note = f"Segmenter unavailable, so no labels, surfaces or measured volumes: {exc}"
        log.warning(note)
        return None, note, {}
    with device_queue().slot(str(getattr(seg, "device", "cpu"))):
        out = service.segment_result(service.Generated(_result.brain, seconds={}), seg)
    return out.labels, out.note, out.seconds


@st.cache_data(max_entries=MAX_BRAINS, show_spinner=False)
def matched_cached(digest: str, root: str, segmenter: str | None, _result: service.Generated) -> service.Generated:
    """The brain whose pixels hash to ``digest`` warped to its requested volumes, with its labels
    (``synth.anatomy.match_brain_volumes``); a failure keeps the brain as sampled and says why in ``note``."""
    import time

    t = time.perf_counter()
    try:
        seg = get_segmenter(root, segmenter)
        with device_queue().slot(str(getattr(seg, "device", "cpu"))):
            brain, labels = service.anatomy().match_brain_volumes(_result.brain, seg)
    except Exception as exc:  # noqa: BLE001 - the brain as sampled is still worth showing
        log.warning("volume matching failed: %s", exc)
        return service.Generated(_result.brain, None, dict(_result.seconds),
                                 f"volume matching failed ({type(exc).__name__}: {exc}); showing the brain as sampled")
    return service.Generated(brain, labels.astype(np.uint8), {**_result.seconds, "match volumes": time.perf_counter() - t},
                             _result.note)


@st.cache_data(max_entries=MAX_BRAINS, show_spinner=False)
def refined_cached(digest: str, root: str, model: str, _result: service.Generated) -> service.Generated:
    """The brain whose pixels hash to ``digest`` through ``model``'s refiner (:func:`service.refine_result`)."""
    generator = get_generator(root, model)
    with device_queue().slot(str(generator.device)):
        return service.refine_result(generator, _result)


def with_refinement(result: service.Generated, request: service.Request) -> service.Generated:
    """``result`` refined when the page shows ``request``'s brain first and refines it after
    (:func:`service.refines_after_showing`: the Fast preview, Refiner on auto); else unchanged."""
    import hashlib

    generator = get_generator(models_root(), request.model)
    provenance = result.brain.provenance.get("refiner")
    if not service.refines_after_showing(generator, request) or (isinstance(provenance, dict) and provenance.get("applied")):
        return result
    digest = hashlib.sha1(result.brain.image.tobytes()).hexdigest()
    try:
        return refined_cached(digest, models_root(), request.model, _result=result)
    except Exception as exc:  # noqa: BLE001 - the brain as sampled is still worth showing
        log.warning("refining failed: %s", exc)
        return service.Generated(result.brain, result.labels, dict(result.seconds),
                                 f"refining failed ({type(exc).__name__}: {exc}); showing the brain as sampled")


def with_labels(result: service.Generated, match_volumes: bool = False) -> service.Generated:
    """``result`` with its segmentation (cached by the brain's pixels), after warping it to its requested
    volumes when ``match_volumes``; unchanged without anatomy."""
    import hashlib

    if service.anatomy() is None or result.labels is not None:
        return result
    digest = hashlib.sha1(result.brain.image.tobytes()).hexdigest()
    if match_volumes:
        matched = matched_cached(digest, models_root(), segmenter_name(), _result=result)
        if matched.labels is not None:
            return matched
        result = service.Generated(result.brain, None, result.seconds, matched.note)  # then label it as sampled
    labels, note, seconds = labels_cached(digest, models_root(), segmenter_name(), _result=result)
    return service.Generated(result.brain, labels, {**result.seconds, **seconds}, result.note or note)


@st.cache_data(max_entries=4, show_spinner=False)
def prepare_scan_cached(digest: str, root: str, segmenter: str | None, _img) -> service.PreparedScan:
    """A user's scan registered, masked, segmented; cached by its bytes' SHA-256 (``digest``)."""
    seg = get_segmenter(root, segmenter) if service.anatomy() is not None else None
    queue = device_queue()
    with queue.slot("registration"):  # one registration at a time: it takes both cores for ~20 s
        return service.prepare_scan(_img, seg)


class _Progress:
    """Feeds ``generate(progress=...)`` into a progress bar drawn outside the cached function.

    The bar's updates run in the context captured here, outside ``st.cache_data``'s recording, so
    they are not stored for replay on a cache hit (replaying into a bar from another run fails).
    """

    # Each update makes the browser redraw the page; on 2 cores that took 0.2 s from an 8-step brain
    # (benchmarks/bench_viewer_browser.py), so the bar moves at most every MIN_INTERVAL seconds.
    MIN_INTERVAL = 0.25

    def __init__(self, bar, label: str):
        self.bar, self.label = bar, label
        self.ctx = contextvars.copy_context()
        self.last = float("-inf")

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self.last < self.MIN_INTERVAL:
            return
        self.last = now
        self.ctx.run(self.bar.progress, min(step / max(total, 1), 1.0), text=f"{self.label}: step {step}/{total}")

    def queued(self, ahead: int) -> None:
        """Tell the user their place in the device queue (``ahead`` generations before theirs)."""
        text = f"{self.label}: queued, {ahead} generation{'s' if ahead != 1 else ''} ahead of yours (one runs at a time)"
        self.ctx.run(self.bar.progress, 0.0, text=text)


def generate(request: service.Request, bar=None, label: str = "Sampling", *, labels: bool = True) -> service.Generated:
    """Cached generation with a progress bar (``bar``: an ``st.progress`` element or ``None``); refined
    (:func:`with_refinement`) and segmented unless ``labels`` is false (then the page shows the brain first
    and :func:`with_refinement` and :func:`with_labels` follow)."""
    c = request.condition
    progress = _Progress(bar, label) if bar is not None else None
    result = generate_cached(
        models_root(), request.model, c.age, c.sex, c.diagnosis, tuple(sorted(c.volumes.items())), request.seed,
        request.steps, request.guidance, request.precision, request.speed, request.refine, _progress=progress,
    )
    return with_labels(with_refinement(result, request), request.match_volumes) if labels else result


def guarded(panel):
    """Show a panel's failure as ``st.error`` (its message, no traceback) and log the details.

    Wraps each tab (and fragments, which rerun on their own) so that a bad value or an unexpected
    failure in one panel never replaces the page with a traceback.
    """

    @functools.wraps(panel)
    def run(*args, **kwargs):
        try:
            return panel(*args, **kwargs)
        except USER_ERRORS as exc:
            st.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the developer
            log.exception("%s failed", panel.__name__)
            st.error(f"Something went wrong ({type(exc).__name__}: {exc}). The details are in the server log.")

    return run


def describe(r: service.Request) -> str:
    c = r.condition
    return f"age {c.age:g}, {c.sex}, {c.diagnosis}, seed {r.seed}"
