"""LogME (You et al., 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning"): how well a backbone's features explain the target labels, before any fine-tuning.

For each class c, a Bayesian linear regression of the one-hot column y_c on the features F
(N × D) with prior w ~ N(0, 1/α) and noise N(0, 1/β); α and β are set by maximising the
evidence with MacKay's fixed-point iteration, and LogME is the maximised log evidence per
sample, averaged over classes. Higher = the features separate the classes better (linearly).
One SVD of FᵀF serves every class, so it costs about one linear probe's forward pass.
"""

from __future__ import annotations

import numpy as np


def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 11) -> float:
    """LogME of `features` (N, D) for integer `labels` (N,); higher is better."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f.T @ f)  # eigen-decomposition of FᵀF (D × D, symmetric)
    evidences = []
    for c in np.unique(y):
        y_c = (y == c).astype(np.float64)
        proj = u.T @ (f.T @ y_c)  # Fᵀy in the eigenbasis
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            gamma = float((beta * s / (alpha + beta * s)).sum())  # effective parameters
            m = u @ (beta * proj / (alpha + beta * s))  # posterior mean of w
            alpha_de = float(m @ m)
            beta_de = float(((y_c - f @ m) ** 2).sum())
            new_alpha, new_beta = gamma / max(alpha_de, 1e-12), (n - gamma) / max(beta_de, 1e-12)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if done:
                break
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2 * beta_de
            - alpha / 2 * alpha_de
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))
