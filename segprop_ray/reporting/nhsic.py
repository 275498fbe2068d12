"""Normalized HSIC (nHSIC): how much a layer's representation Z still depends on the input X and the label Y.

The paper (sections 2.1 and 5.2, after Sakamoto & Sato 2024) reads layer-wise training's failure as
information loss measured by HSIC: nHSIC(X; Z) falling with depth means the representation forgot
the input; nHSIC(Y; Z) says how much it carries about the next token. Here X is the token at a
position, Y the token after it, Z the hidden state at that position.

Choices, and why:

- **Kernels.** Continuous vectors get a Gaussian kernel ``exp(-|a-b|^2 / (2 s^2))`` whose width
  ``s`` is the median pairwise distance (the median heuristic: it makes nHSIC invariant to the
  scale of Z, and to rotations, since it uses distances only). Token ids get the delta kernel
  ``k(a, b) = 1 if a == b else 0`` (the Gram matrix of one-hot vectors): tokens have no geometry.
- **Estimator.** :func:`hsic` is the classical biased estimator ``tr(K H L H) / (n-1)^2`` with the
  centering matrix ``H = I - 11^T/n``. Its bias comes from the kernel diagonals and grows with the
  dimension of Z: at n = 512, two *independent* Gaussian samples of dimension 1024 score a biased
  nHSIC of about 0.77 (0.18 at dimension 64), so for LLM hidden sizes it says little. :func:`nhsic`
  therefore uses the unbiased estimator (Song et al. 2012, :func:`hsic_unbiased`) by default:
  independent samples score about 0 at any dimension, and a fixed dependence scores the same at
  dimension 8 or 4096. ``estimator="biased"`` gives the classical value.
- **Normalization.** ``nHSIC = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (kernel CKA); the unbiased
  value can come out slightly below 0 for independent data and is clipped to [0, 1].
- float64 throughout: the centred sums cancel heavily.
"""

from __future__ import annotations

from typing import Literal

import torch

from segprop_ray.core.blocks import TARGET, prediction_index

Kernel = Literal["gaussian", "delta"]
Estimator = Literal["unbiased", "biased"]


def gaussian_kernel(x: torch.Tensor) -> torch.Tensor:
    """Gaussian Gram matrix (n, n) of rows of ``x`` (n, d), width = median pairwise distance."""
    x = x.reshape(x.shape[0], -1).double()  # (n, d)
    sq_dist = torch.cdist(x, x).pow(2)  # (n, n)
    off_diagonal = sq_dist[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    median_sq = off_diagonal.median()
    if median_sq <= 0:  # more than half the points coincide: fall back to the mean distance
        median_sq = off_diagonal.mean()
    if median_sq <= 0:  # all points equal: a constant kernel (no information)
        return torch.ones_like(sq_dist)
    return torch.exp(-sq_dist / (2 * median_sq))


def delta_kernel(ids: torch.Tensor) -> torch.Tensor:
    """Delta Gram matrix (n, n) of discrete values ``ids`` (n,): 1 where equal, else 0."""
    ids = ids.reshape(-1)  # (n,)
    return (ids[:, None] == ids[None, :]).double()  # (n, n)


def gram(values: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """The Gram matrix of ``values`` under ``kernel`` (``gaussian`` or ``delta``)."""
    if kernel == "gaussian":
        return gaussian_kernel(values)
    if kernel == "delta":
        return delta_kernel(values)
    raise ValueError(f"unknown kernel {kernel!r} (gaussian or delta)")


def hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimator ``tr(K H L H) / (n-1)^2`` of two (n, n) Gram matrices (Gretton et al. 2005)."""
    n = K.shape[0]
    centering = torch.eye(n, dtype=K.dtype, device=K.device) - 1.0 / n  # H = I - 11^T/n
    return torch.trace(K @ centering @ L @ centering) / (n - 1) ** 2


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) Gram matrices; needs n >= 4."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {n}")
    K, L = _zero_diagonal(K), _zero_diagonal(L)
    ones = torch.ones(n, 1, dtype=K.dtype, device=K.device)  # (n, 1)
    both = torch.trace(K @ L)
    products_of_sums = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (ones.T @ K @ L @ ones).squeeze()
    return (both + products_of_sums - cross) / (n * (n - 3))


def _zero_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    return matrix - torch.diag_embed(torch.diagonal(matrix))


def nhsic(x: torch.Tensor, y: torch.Tensor, kernel_x: Kernel = "gaussian", kernel_y: Kernel = "gaussian",
          estimator: Estimator = "unbiased") -> float:
    """Normalized HSIC of samples ``x`` and ``y`` (first dimension = sample), in [0, 1]; 0 when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"x and y need the same number of samples, got {len(x)} and {len(y)}")
    estimate = hsic_unbiased if estimator == "unbiased" else hsic
    K, L = gram(x, kernel_x), gram(y, kernel_y)
    denominator = torch.sqrt(estimate(K, K) * estimate(L, L))
    if not denominator > 0:
        return 0.0
    return float((estimate(K, L) / denominator).clamp(0.0, 1.0))


def sample_positions(num_sequences: int, seq_len: int, num_tokens: int, seed: int = 0,
                     token_kind: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of up to ``num_tokens`` distinct positions whose next token is a label: never the last one
    of a sequence and, with ``token_kind`` (N, T), only where the next token is a target (no padding, no prompt,
    never across two packed examples).

    The choice depends only on the shape (and token kinds) and the seed.
    """
    if token_kind is None:
        token_kind = torch.full((num_sequences, seq_len), TARGET, dtype=torch.uint8)
    candidates = prediction_index(token_kind)  # (M,) flat b*T + t
    generator = torch.Generator().manual_seed(seed)
    flat = candidates[torch.randperm(len(candidates), generator=generator)[: min(num_tokens, len(candidates))]]
    return flat // seq_len, flat % seq_len


def representation_nhsic(hidden: torch.Tensor, input_ids: torch.Tensor, num_tokens: int = 512,
                         seed: int = 0, estimator: Estimator = "unbiased",
                         token_kind: torch.Tensor | None = None) -> dict[str, float]:
    """nHSIC of hidden states (N, T, H) with their tokens (X) and next tokens (Y) at sampled positions (those
    predicting a target when ``token_kind`` is given).

    Returns ``{"nhsic_input": nHSIC(Z, X), "nhsic_label": nHSIC(Z, Y)}``: Gaussian kernel on Z, delta
    kernel on token ids; the same positions for the same shapes and ``seed``.
    """
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and input_ids {tuple(input_ids.shape)} disagree on (N, T)")
    if input_ids.shape[1] < 2 or num_tokens < 4:
        raise ValueError("need sequences of at least 2 tokens and num_tokens >= 4")
    rows, cols = sample_positions(input_ids.shape[0], input_ids.shape[1], num_tokens, seed, token_kind)
    rows_on, cols_on = rows.to(hidden.device), cols.to(hidden.device)
    z = hidden[rows_on, cols_on].detach().double().cpu()  # (n, H)
    ids = input_ids.cpu()
    x, y = ids[rows, cols], ids[rows, cols + 1]  # (n,), (n,)
    return {"nhsic_input": nhsic(z, x, "gaussian", "delta", estimator),
            "nhsic_label": nhsic(z, y, "gaussian", "delta", estimator)}
