"""Statistical checks shared by the sampling tests (CPU reference path and CUDA kernel).

A sampler is checked against the exact distribution it should draw from (``expected``, ``[V]``):

* support: no draw ever falls where ``expected`` is 0 (outside the top-k / top-p set);
* chi-square: tokens expected at least ``min_expected`` times are their own cell, the rest are
  merged (in decreasing probability) into cells of at least ``min_expected``; the statistic must
  stay below the chi-square quantile for a false-alarm rate of ~1e-7 per check;
* total variation over the same cells, below ``E[TV] + sqrt(log(1/delta) / (2n))`` (Jensen bound on
  the mean, McDiarmid's inequality for the deviation, delta = 1e-9).

Thresholds depend only on the number of draws and the cells, never on the sampler's output.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "data" / "smollm2_logits.safetensors"
Z_CHI2 = 5.2  # one-sided normal quantile for ~1e-7
TV_DELTA = 1e-9


def fixture_logits() -> torch.Tensor:
    """Real next-token logits of SmolLM2-135M-Instruct, fp32 ``[4, 49152]`` (stored as fp16)."""
    from safetensors.torch import load_file

    return load_file(str(FIXTURE))["logits"].float()


def synthetic_logits(kind: str, vocab: int, seed: int = 0) -> torch.Tensor:
    """fp32 ``[vocab]`` test logits.

    zipf: log of a Zipf(1.1) law at random positions plus small noise (a peaked LM-like head);
    near_uniform: N(0, 0.05^2); one_hot: N(0, 1) with one token 30 above; ties: values on a
    0.5 grid (many exact ties, also at top-k boundaries).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "zipf":
        ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
        values = -1.1 * ranks.log() + 0.05 * torch.randn(vocab, generator=gen, dtype=torch.float64)
        return values[torch.randperm(vocab, generator=gen)].float() + 3.0
    if kind == "near_uniform":
        return 0.05 * torch.randn(vocab, generator=gen)
    if kind == "one_hot":
        x = torch.randn(vocab, generator=gen)
        x[int(torch.randint(vocab, (1,), generator=gen))] += 30.0
        return x
    if kind == "ties":
        return (torch.randn(vocab, generator=gen) * 4.0).round() / 2
    raise ValueError(f"unknown logits kind {kind!r}")


def robust_top_p(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_gap: float = 2e-3
) -> float:
    """A top_p near ``top_p`` that sits in the middle of a gap between consecutive cumulative
    masses, so fp32 rounding (ours, the reference's or HF's) cannot flip a boundary token.

    Tokens are kept iff the mass strictly above them is < top_p; those masses take the values
    ``c_0 = 0 < c_1 < ...`` (one per group of tied logits). Returns the midpoint of the gap
    ``(c_j, c_{j+1})`` of width >= ``min_gap`` whose midpoint is closest to ``top_p``.
    """
    if top_p >= 1.0:
        return top_p
    x = logits.double() / temperature
    if 0 < top_k < x.numel():
        kth = x.sort(descending=True).values[top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    values, counts = torch.unique(x[torch.isfinite(x)], sorted=True, return_counts=True)
    group_mass = (values - values.max()).exp() * counts
    group_mass = (group_mass / group_mass.sum()).flip(0)  # most probable group first
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.float64), group_mass.cumsum(0)]
    )  # c_0 .. c_G (= 1)
    lo, hi = starts[:-1], starts[1:]
    ok = (hi - lo) >= min_gap
    if not bool(ok.any()):
        raise ValueError("no cumulative-mass gap wide enough for a robust top_p; use another case")
    mids = (lo + hi) / 2
    dist = torch.where(ok, (mids - top_p).abs(), torch.full_like(mids, float("inf")))
    return float(mids[int(dist.argmin())])


def oracle_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Independent float64 statement of the sampling distribution of one row ``[V]``: keep the
    tokens with fewer than k strictly larger logits, then those whose strictly-more-probable mass
    (within the top-k set) is < top_p, renormalize. ``temperature`` 0 is the argmax (lowest index)."""
    x = logits.double()
    if temperature == 0:
        out = torch.zeros_like(x)
        out[int(torch.nonzero(x == x.max())[0])] = 1.0
        return out
    x = x / temperature
    larger = (x[None, :] > x[:, None]).sum(1) if x.numel() <= 4096 else None
    keep = torch.isfinite(x) | (x == float("-inf"))
    if 0 < top_k < x.numel():
        if larger is None:
            kth = x.sort(descending=True).values[top_k - 1]
            keep &= x >= kth
        else:
            keep &= larger < top_k
    w = torch.where(keep, (x - x[keep].max()).exp(), torch.zeros_like(x))
    if top_p < 1.0:
        order = torch.argsort(x.masked_fill(~keep, float("-inf")), descending=True, stable=True)
        ws, xs = w[order], x[order]
        excl = ws.cumsum(0) - ws
        # tied logits share the mass above their group's first member
        first = torch.ones_like(xs, dtype=torch.bool)
        first[1:] = xs[1:] != xs[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(xs.numel()), 0), 0).values
        above = excl[group_start] / w.sum()
        keep_sorted = above < top_p
        keep_sorted[0] = True
        keep = keep & torch.zeros_like(keep).scatter(0, order, keep_sorted)
        w = torch.where(keep, w, torch.zeros_like(w))
    return w / w.sum()


def counts_of(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 ``[vocab]`` histogram of token ids (on CPU)."""
    draws = draws.flatten().cpu()
    assert draws.dtype == torch.int64
    assert int(draws.min()) >= 0 and int(draws.max()) < vocab, (
        f"token id out of range [0, {vocab}): min {int(draws.min())}, max {int(draws.max())}"
    )
    return torch.bincount(draws, minlength=vocab)


def assert_in_support(counts: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """No draw where the expected probability is 0 (outside the kept set)."""
    outside = (expected.cpu() <= 0) & (counts > 0)
    if bool(outside.any()):
        ids = torch.nonzero(outside).flatten()[:10].tolist()
        raise AssertionError(
            f"{what}: {int(counts[outside].sum())} draws outside the kept set (token ids {ids}, "
            f"kept set size {int((expected > 0).sum())})"
        )


def cells(counts: torch.Tensor, expected: torch.Tensor, n: int, min_expected: float = 20.0):
    """Observed and expected counts per chi-square cell (float64 ``[G]`` each)."""
    expected = expected.double().cpu()
    counts = counts.double().cpu()
    exp_counts = expected * n
    big = exp_counts >= min_expected
    obs_cells = [counts[big]]
    exp_cells = [exp_counts[big]]
    small = torch.nonzero(~big & (expected > 0)).flatten()
    if small.numel():
        order = small[expected[small].argsort(descending=True)]
        before = exp_counts[order].cumsum(0) - exp_counts[order]  # expected count of earlier tokens
        cell_id = (before / min_expected).floor().long()
        cell_id = torch.clamp(
            cell_id, max=max(int(cell_id[-1]) - 1, 0)
        )  # last cell joins its predecessor
        obs_cells.append(
            torch.zeros(int(cell_id.max()) + 1, dtype=torch.float64).index_add_(
                0, cell_id, counts[order]
            )
        )
        exp_cells.append(
            torch.zeros(int(cell_id.max()) + 1, dtype=torch.float64).index_add_(
                0, cell_id, exp_counts[order]
            )
        )
    return torch.cat(obs_cells), torch.cat(exp_cells)


def chi2_critical(df: int, z: float = Z_CHI2) -> float:
    """Upper chi-square quantile (Wilson-Hilferty approximation; conservative for tiny df)."""
    df = max(df, 1)
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_distribution(
    draws: torch.Tensor, expected: torch.Tensor, what: str = "", min_expected: float = 20.0
) -> dict:
    """Support, chi-square and total-variation checks of ``draws`` (int64 ``[n]``) against the
    probabilities ``expected`` (``[V]``, summing to 1). Returns the statistics."""
    expected = expected.double().cpu()
    vocab = expected.numel()
    n = draws.numel()
    counts = counts_of(draws, vocab)
    assert_in_support(counts, expected, what)
    obs, exp = cells(counts, expected, n, min_expected)
    stats = {"n": n, "cells": int(obs.numel())}
    if obs.numel() >= 2:
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        crit = chi2_critical(int(obs.numel()) - 1)
        stats.update(chi2=chi2, chi2_critical=crit)
        assert chi2 <= crit, (
            f"{what}: chi-square {chi2:.1f} > {crit:.1f} over {obs.numel()} cells ({n} draws)"
        )
    q = exp / n
    tv = 0.5 * float((obs / n - q).abs().sum())
    bound = 0.5 * float(torch.sqrt(q * (1 - q) / n).sum()) + math.sqrt(
        math.log(1 / TV_DELTA) / (2 * n)
    )
    stats.update(tv=tv, tv_bound=bound)
    assert tv <= bound, f"{what}: total variation {tv:.4f} > bound {bound:.4f} ({n} draws)"
    return stats
