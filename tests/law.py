"""Goodness of fit of emitted tokens to an exact law (chi-squared, fixed seeds)."""

import numpy as np
from scipy.stats import chisquare

ALPHA = 1e-3


def assert_law(counts, law, what):
    counts, law = counts.ravel(), law.ravel()
    assert counts[law == 0].sum() == 0, f"{what}: tokens emitted where the target has probability 0"
    exp = law * counts.sum()
    big = exp >= 5
    f_obs = np.append(counts[big], counts[~big & (law > 0)].sum())
    f_exp = np.append(exp[big], exp[~big & (law > 0)].sum())
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    if len(f_obs) < 2:
        return 1.0  # a point mass: the empty-cells check above is the whole test
    p = chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue
    assert p > ALPHA, f"{what}: chi-squared p = {p:.2e} (counts do not follow the target law)"
    return p
