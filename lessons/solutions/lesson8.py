"""Lesson 8 exercises: SPEC §11's threshold mask and its calibration rule."""

import math

import numpy as np


def threshold_mask(x, tau):
    """Bool mask [..., D]: |x| > tau, strict (entries equal to tau are dropped)."""
    return np.abs(x) > tau


def calibrate_threshold(values, sparsity):
    """tau = a_j of |values| sorted ascending (1-indexed), j = floor(S n); 0 if j = 0."""
    a = np.sort(np.abs(values).reshape(-1))
    j = math.floor(sparsity * a.size)
    return 0.0 if j == 0 else float(a[j - 1])
