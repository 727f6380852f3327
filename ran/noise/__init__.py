"""Label noise (the paper's robustness study): seeded noisy labels per train record."""

from ran.noise.corrupt import corrupt, pair_targets, transition_matrix
from ran.noise.report import noise_report, validate_noise
from ran.noise.stage import make_noisy_labels, tracked_noise

__all__ = [
    "corrupt",
    "make_noisy_labels",
    "noise_report",
    "pair_targets",
    "tracked_noise",
    "transition_matrix",
    "validate_noise",
]
