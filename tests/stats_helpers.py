"""Goodness-of-fit helpers for the sampling tests (chi-square with pooled rare bins, total variation)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy.stats import chisquare

#: Significance level: an exact sampler fails a test with probability ALPHA (seeds are fixed, so never flaky).
ALPHA = 1e-3


def goodness_of_fit(samples: list[int], p: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """(chi-square p-value, total-variation distance) of samples against the exact distribution p [V]."""
    n = len(samples)
    p = p.double().cpu().numpy()
    counts = Counter(samples)
    big = np.nonzero(p * n >= min_expected)[0]
    obs = [counts.get(int(i), 0) for i in big]
    exp = [p[i] * n for i in big]
    rest_obs = n - sum(obs)
    rest_exp = n - sum(exp)
    if rest_exp >= min_expected:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:  # fold the tiny remainder into the largest bin so the totals still match
        j = int(np.argmax(exp))
        obs[j] += rest_obs
        exp[j] += rest_exp
    pvalue = float(chisquare(obs, exp).pvalue) if len(obs) > 1 else 1.0
    emp = np.zeros_like(p)
    for t, c in counts.items():
        emp[t] = c / n
    tv = 0.5 * float(np.abs(emp - p).sum())
    return pvalue, tv


def tv_bound(p: torch.Tensor, n: int, z: float = 4.0) -> float:
    """A conservative bound on the TV distance of n exact samples: E[TV] <= 0.5*sum(sqrt(p(1-p)/n)), plus z sd."""
    p = p.double()
    mean = 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    return mean * 1.0 + z * 0.5 / np.sqrt(n)
