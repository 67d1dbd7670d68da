"""An energy monitor for Hugging Face causal LMs: per-token log K, surprisal, entropy, log E, ‖h‖ and rolling
statistics recorded through hooks during a forward pass or ``generate``, calibrated on natural text, with
anomaly scores and flags at a chosen false-positive rate.

Public API:
    EnergyMonitor(model, *, window=16, impl="auto")   attach / detach / records / write / calibrate / score
    SequenceRecord, Calibration, Scored, FEATURES, DEFAULT_SCORE_FEATURES
"""

from .calibration import DEFAULT_SCORE_FEATURES, Calibration, Scored
from .monitor import EnergyMonitor
from .records import FEATURES, ROLLING_FEATURES, TOKEN_FEATURES, SequenceRecord, write_records

__all__ = ["EnergyMonitor", "SequenceRecord", "Calibration", "Scored", "FEATURES", "TOKEN_FEATURES",
           "ROLLING_FEATURES", "DEFAULT_SCORE_FEATURES", "write_records"]
