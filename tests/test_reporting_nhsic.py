"""Normalized HSIC: self-dependence is 1, independence is about 0, invariances, and the token diagnostics."""

from __future__ import annotations

import pytest
import torch

from segprop_ray.reporting.nhsic import (delta_kernel, gaussian_kernel, hsic, hsic_unbiased, nhsic,
                                         representation_nhsic, sample_positions)

N = 512
NEAR_ZERO = 0.05  # |nHSIC| of independent samples at n = 512 (observed: below 0.01 with these seeds)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(dim, dim, seed=seed))
    return q  # (dim, dim), orthogonal


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_a_representation_with_itself_scores_one(estimator):
    z = randn(N, 64, seed=0)
    assert nhsic(z, z, estimator=estimator) == pytest.approx(1.0, abs=1e-6)
    tokens = torch.randint(0, 40, (N,), generator=torch.Generator().manual_seed(0))
    assert nhsic(tokens, tokens, "delta", "delta", estimator) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dim", [2, 64, 1024])
def test_independent_noise_is_near_zero_and_dependence_is_clearly_larger(dim):
    a, b = randn(N, dim, seed=1), randn(N, dim, seed=2)
    independent, dependent = nhsic(a, b), nhsic(a, a + 0.5 * b)
    assert independent < NEAR_ZERO
    assert dependent > 0.5 and dependent > 10 * independent


def test_biased_estimator_drifts_up_with_dimension_which_is_why_unbiased_is_the_default():
    low = nhsic(randn(N, 2, seed=1), randn(N, 2, seed=2), estimator="biased")
    high = nhsic(randn(N, 1024, seed=1), randn(N, 1024, seed=2), estimator="biased")
    assert low < NEAR_ZERO  # fine in 2 dimensions ...
    assert high > 0.5  # ... but independent 1024-d noise looks strongly dependent


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_invariant_to_scaling_and_rotation_of_z(estimator):
    z = randn(N, 32, seed=3)
    y = torch.tanh(z @ randn(32, 4, seed=4) / 3) + 0.1 * randn(N, 4, seed=5)  # a non-linear dependence
    reference = nhsic(z, y, estimator=estimator)
    assert reference > 0.2
    assert nhsic(7.5 * z, y, estimator=estimator) == pytest.approx(reference, abs=1e-9)
    assert nhsic(z @ random_rotation(32, seed=5), y, estimator=estimator) == pytest.approx(reference, abs=1e-9)


def test_biased_hsic_matches_its_definition():
    K, L = gaussian_kernel(randn(6, 3, seed=6)), gaussian_kernel(randn(6, 3, seed=7))
    H = torch.eye(6, dtype=torch.float64) - 1 / 6
    assert float(hsic(K, L)) == pytest.approx(float(torch.trace(K @ H @ L @ H)) / 25, rel=1e-12)


def test_unbiased_hsic_equals_the_u_centered_inner_product():
    K, L = gaussian_kernel(randn(9, 3, seed=8)), gaussian_kernel(randn(9, 3, seed=9))

    def u_centered(A: torch.Tensor) -> torch.Tensor:  # Szekely & Rizzo's U-centering, with the diagonal zeroed
        n, A = len(A), A - torch.diag(torch.diag(A))
        U = A - A.sum(0, keepdim=True) / (n - 2) - A.sum(1, keepdim=True) / (n - 2) + A.sum() / ((n - 1) * (n - 2))
        return U - torch.diag(torch.diag(U))

    assert float(hsic_unbiased(K, L)) == pytest.approx(float((u_centered(K) * u_centered(L)).sum()) / (9 * 6), rel=1e-10)


def test_delta_kernel_is_the_gram_matrix_of_one_hot_vectors():
    ids = torch.tensor([3, 1, 3, 0])
    one_hot = torch.nn.functional.one_hot(ids).double()  # (n, V)
    assert torch.equal(delta_kernel(ids), one_hot @ one_hot.T)


def token_blocks(seed: int, num: int = 16, length: int = 33, vocab: int = 30) -> torch.Tensor:
    return torch.randint(0, vocab, (num, length), generator=torch.Generator().manual_seed(seed))  # (N, T)


def test_label_dependent_representation_scores_higher_on_the_label_than_random_ones():
    ids = token_blocks(seed=0)
    table = randn(30, 48, seed=10)  # a random embedding per token id
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (N, T): the token after each position
    predictive = table[next_ids] + 0.5 * randn(*ids.shape, 48, seed=11)  # (N, T, H): knows the next token
    copying = table[ids] + 0.5 * randn(*ids.shape, 48, seed=12)  # (N, T, H): knows the current token
    noise = randn(*ids.shape, 48, seed=13)  # (N, T, H)

    scores = {name: representation_nhsic(h, ids, num_tokens=N) for name, h in
              (("predictive", predictive), ("copying", copying), ("noise", noise))}

    assert scores["predictive"]["nhsic_label"] > 0.5 > NEAR_ZERO > scores["noise"]["nhsic_label"]
    assert scores["predictive"]["nhsic_label"] > 5 * scores["predictive"]["nhsic_input"]
    assert scores["copying"]["nhsic_input"] > 5 * scores["copying"]["nhsic_label"]
    assert scores["noise"]["nhsic_input"] < NEAR_ZERO


def test_positions_are_deterministic_per_seed_distinct_and_never_the_last():
    rows, cols = sample_positions(4, 9, num_tokens=10_000, seed=0)
    assert len(rows) == 4 * 8  # every position but the last of each sequence, once
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 32 and int(cols.max()) == 7
    ids, hidden = token_blocks(seed=1, num=4, length=9), randn(4, 9, 8, seed=14)
    first = representation_nhsic(hidden, ids, 20, seed=3)
    assert representation_nhsic(hidden, ids, 20, seed=3) == first
    assert representation_nhsic(hidden, ids, 20, seed=4) != first


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="disagree on"):
        representation_nhsic(randn(2, 5, 4, seed=0), token_blocks(seed=0, num=2, length=6))
