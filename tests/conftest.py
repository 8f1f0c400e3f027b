import os
from pathlib import Path

import pytest

from synth.data.ixi import default_ixi_root

IXI = default_ixi_root()
needs_ixi = pytest.mark.skipif(not (IXI / "t1").is_dir(), reason=f"IXI data not found at {IXI}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from synth.testing import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny-test-model", seed=0)
    return root / "tiny-test-model"


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    import synth

    return synth.load_generator(tiny_model_dir, device="cpu")
