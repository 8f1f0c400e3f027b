"""Shared resources of the viewer: models, the device queue, the cached generation, error guard.

Streamlit objects shared by every session (``st.cache_resource``: never mutate them) and the
brain cache (``st.cache_data``), keyed by models folder, model, condition, seed, steps, guidance,
speed, precision and segmenter. Environment: ``SYNTHBRAIN_DEVICE`` (default ``auto``: GPU when present, else CPU),
``SYNTHBRAIN_SEGMENTER`` (default ``synthbrain-seg-2mm``), ``SYNTHBRAIN_VIEWER_CACHE`` (brains
kept, default 24, read at start).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import warnings
from pathlib import Path

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
    segmenter_name: str | None = None, precision: str | None = None, speed: str = "standard", _progress=None,
) -> service.Generated:
    """The brain (and labels) for one request; cached by model, condition, seed and sampling options."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parse_request already showed them
        request = service.Request(model, synth.Condition(age, sex, diagnosis, dict(volumes)), seed, steps, guidance,
                                  precision=precision, speed=speed)
    generator = get_generator(root, model)
    segmenter, note = None, ""
    if service.anatomy() is not None:
        try:
            segmenter = get_segmenter(root, segmenter_name)
        except Exception as exc:  # keep generating images even if the segmenter cannot load
            note = f"Segmenter unavailable, so no labels, surfaces or measured volumes: {exc}"
            log.warning(note)
    queue, where = device_queue(), str(generator.device)
    on_wait = None if _progress is None else _progress.queued
    with queue.slot(where, on_wait=on_wait):
        result = service.run_generation(generator, request, progress=_progress, segmenter=segmenter)
    result.note = result.note or note
    return result


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

    def __init__(self, bar, label: str):
        self.bar, self.label = bar, label
        self.ctx = contextvars.copy_context()

    def __call__(self, step: int, total: int) -> None:
        self.ctx.run(self.bar.progress, min(step / max(total, 1), 1.0), text=f"{self.label}: step {step}/{total}")

    def queued(self, ahead: int) -> None:
        """Tell the user their place in the device queue (``ahead`` generations before theirs)."""
        text = f"{self.label}: queued, {ahead} generation{'s' if ahead != 1 else ''} ahead of yours (one runs at a time)"
        self.ctx.run(self.bar.progress, 0.0, text=text)


def generate(request: service.Request, bar=None, label: str = "Sampling") -> service.Generated:
    """Cached generation with a progress bar (``bar``: an ``st.progress`` element or ``None``)."""
    c = request.condition
    progress = _Progress(bar, label) if bar is not None else None
    return generate_cached(
        models_root(), request.model, c.age, c.sex, c.diagnosis, tuple(sorted(c.volumes.items())), request.seed,
        request.steps, request.guidance, segmenter_name(), request.precision, request.speed, _progress=progress,
    )


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
