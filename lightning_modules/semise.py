"""SEMISE: semi-supervised severity representation pre-training (Tran et al. 2025, arXiv 2501.03848;
spec/methods/semise.md; no public code: the objective below is the spec's normative lemis reading).

L = alpha L_NT-Xent + (1 - alpha) (w_margin L_margin + w_rank L_rank): SimCLR's NT-Xent on two views of every
image; a margin contrastive loss pulling healthy-healthy and anomaly-anomaly pairs together and pushing
healthy-anomaly pairs at least ``margin`` apart in cosine distance; a Bradley-Terry ranking loss on a severity
score for pairs of different grades. This file holds the losses and the pair sampling (checked by the spec's
hand-computed examples); the pre-training module and the downstream runs follow (issue "SEMISE").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's loss. z [2N, d] L2-normalised, the view-1 block then the view-2 block (positives k <-> k + N):
    l_a = -log(exp(sim(a, p)) / sum_{k != a} exp(sim(a, k))), sim = z_a . z_k / tau; the mean over the 2N anchors."""
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def unordered_pairs(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) with i < j, i ascending then j ascending."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


def margin_loss(distance: torch.Tensor, similar: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """1/(2P) sum over pairs of y D^2 + (1 - y) max(0, m - D)^2; distance, similar [P]; no pair -> 0."""
    if distance.numel() == 0:
        return distance.new_zeros(())
    y = similar.to(distance.dtype)
    return (y * distance**2 + (1 - y) * F.relu(margin - distance) ** 2).sum() / (2 * distance.numel())


def healthy_anomaly_loss(z: torch.Tensor, healthy: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The margin loss over every unordered pair of embeddings with known flags: similar = same flag,
    D = 1 - z_i . z_j. z [M, d] normalised; healthy [M] in {0, 1} or -1 (unknown, in no pair)."""
    known = torch.nonzero(healthy >= 0).flatten()
    i, j = unordered_pairs(len(known), z.device)
    i, j = known[i], known[j]
    distance = 1 - (z[i] * z[j]).sum(1)
    return margin_loss(distance, healthy[i] == healthy[j], margin)


def severity_pairs(grade: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j) with grade_i > grade_j (i the more severe), both known (>= 0); i ascending, then j."""
    g = grade.tolist()
    return [(i, j) for i in range(len(g)) for j in range(len(g)) if g[i] >= 0 and g[j] >= 0 and g[i] > g[j]]


def ranking_loss(score: torch.Tensor, grade: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Bradley-Terry: mean over ``severity_pairs`` of softplus(-(s_i - s_j)) (= -log sigma(s_i - s_j)); also the
    number of pairs and the fraction ordered correctly (s_i > s_j). No pair -> (0, 0, nan)."""
    pairs = severity_pairs(grade)
    if not pairs:
        return score.new_zeros(()), 0, float("nan")
    i, j = (torch.tensor(idx, device=score.device) for idx in zip(*pairs))
    margin = score[i] - score[j]
    return F.softplus(-margin).mean(), len(pairs), float((margin > 0).float().mean())


def combined_loss(nt: torch.Tensor, margin: torch.Tensor, rank: torch.Tensor, alpha: float = 0.5,
                  w_margin: float = 1.0, w_rank: float = 1.0) -> torch.Tensor:
    """alpha L_nt + (1 - alpha) (w_margin L_margin + w_rank L_rank); alpha = 1 is SimCLR alone (the supervised
    terms contribute exactly 0), alpha = 0 drops NT-Xent."""
    supervised = w_margin * margin + w_rank * rank
    if alpha == 1:
        return nt
    if alpha == 0:
        return supervised
    return alpha * nt + (1 - alpha) * supervised
