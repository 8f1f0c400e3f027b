"""Data preparation: real IXI scans -> registered, skull-stripped volumes on the model grid."""

from .ixi import MEASURES, IXISubject, default_ixi_root, find_subjects, split_of
from .prepare import PreparedData, prepare_ixi

__all__ = [
    "MEASURES",
    "IXISubject",
    "PreparedData",
    "default_ixi_root",
    "find_subjects",
    "prepare_ixi",
    "split_of",
]
