"""The viewer's security defaults: bound to localhost, uploads size-limited, no UI path reaches the file system."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from viewer import service  # noqa: E402


def _config() -> dict:
    return tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())


def test_the_viewer_binds_to_localhost_by_default():
    cfg = _config()
    assert cfg["server"]["address"] in ("localhost", "127.0.0.1")
    assert cfg["browser"]["gatherUsageStats"] is False
    start = (ROOT / "scripts" / "start.sh").read_text()
    assert "0.0.0.0" not in start
    assert '--server.address "${SYNTHBRAIN_HOST:-localhost}"' in start  # another host only when asked for


def test_uploads_are_size_limited_by_streamlit_and_by_the_app():
    assert 0 < _config()["server"]["maxUploadSize"] <= service.MAX_UPLOAD_MB <= 64
    with pytest.raises(ValueError, match="at most"):
        service.read_upload(b"\x1f\x8b" + b"\x00" * (2 * 1024 * 1024), max_mb=1)


@pytest.mark.parametrize("model", ["../../etc", "/etc/passwd", "assets/models/synthbrain-ldm-2mm", ""])
def test_a_model_name_from_the_ui_must_be_one_listed(model):
    with pytest.raises(ValueError, match="must be one of"):
        service.parse_request(model=model, age=60, sex="F", diagnosis="CN", seed=0, models=["synthbrain-ldm-2mm"])


def test_an_upload_never_uses_the_users_file_name_as_a_path(tmp_path, monkeypatch):
    import gzip

    import nibabel as nib
    import numpy as np

    monkeypatch.chdir(tmp_path)
    data = gzip.compress(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    service.read_upload(data)  # the bytes alone: no name reaches the reader
    assert not list(tmp_path.iterdir())  # nothing written where we are (only a temporary folder, removed)
