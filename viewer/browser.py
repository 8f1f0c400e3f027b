"""What the user's browser can draw: the WebGL renderer, asked once per session by a tiny component.

NiiVue draws in the browser with WebGL2. With a graphics card that is instant; where WebGL runs in
software (SwiftShader, llvmpipe: a browser without a GPU, a remote desktop, a locked-down virtual
machine) NiiVue takes about 2.5 s to show a brain on 2 cores (``benchmarks/bench_viewer_browser.py``),
longer than generating it, and every redraw is slow. Such a browser starts on server-drawn slices
instead (0.4 s); NiiVue stays one click away.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import streamlit as st
import streamlit.components.v1 as components

__all__ = ["SOFTWARE_RENDERERS", "is_software_renderer", "webgl_info"]

# Renderer strings of WebGL implementations that run on the CPU. Chromium without a GPU reports
# "ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero) ...), SwiftShader driver)"; Mesa's
# "llvmpipe (LLVM 15.0.6, 256 bits)" or "softpipe"; Windows' "Microsoft Basic Render Driver".
SOFTWARE_RENDERERS = re.compile(r"swiftshader|llvmpipe|softpipe|software|basic render|lavapipe", re.IGNORECASE)

_probe = components.declare_component("synthbrain_webgl_probe", path=str(Path(__file__).parent / "webgl_probe"))


def is_software_renderer(info: Mapping | None) -> bool:
    """Whether ``info`` (what the probe reported) describes WebGL drawn by the CPU, or no WebGL at all.

    ``None`` (nothing reported yet) is not software: the viewer keeps its usual layout until it knows.
    """
    if not info:
        return False
    renderer = str(info.get("renderer") or "")
    return not info.get("webgl2") or not renderer or bool(SOFTWARE_RENDERERS.search(renderer))


def webgl_info() -> dict | None:
    """This session's WebGL report (``webgl2``, ``renderer``, ``vendor``), or ``None`` until the browser answers.

    Draws a zero-height component on the first call of a run; the answer arrives with the next rerun
    and is kept in session state, so the probe runs once per browser session.
    """
    if "webgl" not in st.session_state:
        value = _probe(key="webgl_probe", default=None)
        if isinstance(value, Mapping):
            st.session_state.webgl = dict(value)
    return st.session_state.get("webgl")
