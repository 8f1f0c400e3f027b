"""SynthBrain's browser viewer (``streamlit run viewer/app.py``).

``app.py`` draws the widgets; ``render`` (slices, difference maps, PNG/GIF), ``scene`` (PyVista
scenes) and ``service`` (requests, device queue, anatomy, exports) hold Streamlit-free helpers
that tests import directly. Everything shown is synthetic and not for clinical use.
"""
