import os
from pathlib import Path

import pytest

# One numeric path for the whole suite on every CPU (with or without native bf16), so seeded
# expectations and tolerances hold on both kinds of CI machine. The automatic choice itself is
# tested in tests/test_runtime.py, which sets or clears this variable where it needs to.
os.environ.setdefault("SYNTHBRAIN_PRECISION", "fp32")
# Likewise the same CPU threads for every brain, however busy the machine is: left to adapt to the load
# (synth.runtime.AdaptiveThreads), a brain's last float bits follow the thread count, and two brains a test
# compares differed by 2e-6 when a busy 2-core CI runner gave them different counts.
from synth.runtime import usable_cpus  # noqa: E402

os.environ.setdefault("SYNTHBRAIN_THREADS", str(min(2, usable_cpus())))

from synth.data.ixi import default_ixi_root

IXI = default_ixi_root()
needs_ixi = pytest.mark.skipif(not (IXI / "t1").is_dir(), reason=f"IXI data not found at {IXI}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``), so a fixture can tell whether its
    test failed and print what helps (tests/test_e2e_browser.py prints the server log and the page)."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


@pytest.fixture(scope="session")
def viewer_bench():
    """``benchmarks/bench_viewer_load.py`` as a module: the server, browser and page helpers the viewer's
    end-to-end tests share with its benchmarks."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_viewer_load.py"
    spec = importlib.util.spec_from_file_location("bench_viewer_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def write_prepared(root: Path, ages=(25, 30, 45, 50, 65, 75), size: int = 32, split: str = "test"):
    """A small prepared-data folder (phantom 'brains') in the layout of ``synthbrain prepare``."""
    import csv

    import numpy as np

    from synth.data.prepare import TABLE_FIELDS, PreparedData
    from synth.io import save_nifti

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    rows = []
    for i, age in enumerate(ages):
        mask = (g**2).sum(0) < 0.7
        t1 = (mask * (0.5 + 0.3 * np.sin(5 * g[0] + i) + rng.normal(0, 0.02, mask.shape))).clip(0, 1)
        mrid = f"SYN{i:03d}-XX-0000"
        save_nifti(root / "volumes" / f"{mrid}_t1.nii.gz", t1.astype(np.float32), np.eye(4))
        save_nifti(root / "volumes" / f"{mrid}_labels.nii.gz", mask.astype(np.uint8), np.eye(4))
        rows.append({"mrid": mrid, "subject_id": mrid[:6], "split": split, "age": age, "sex": "FM"[i % 2],
                     "icv": 1.5e6, "brain": 1.3e6 - 2e3 * age, "gm": 7e5, "wm": 5e5,
                     "lateral_ventricles": 1e4 + 300 * age, "hippocampus": 8e3, "reg_ncc": 0.95})
    with open(root / "subjects.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return PreparedData.load(root)
