"""SynthBrain's browser viewer (``streamlit run viewer/app.py``).

``app.py`` draws the page and sidebar, ``tabs.py`` the panels and ``resources.py`` holds the
shared models, device queue and brain cache. ``render`` (slices, difference maps, PNG/GIF),
``scene`` (PyVista scenes) and ``service`` (requests, anatomy, exports) are Streamlit-free helpers
that tests import directly. Everything shown is synthetic and not for clinical use.
"""
