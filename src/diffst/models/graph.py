"""Co-expression intensity-based gene-correlation graph (CIGC-Graph, paper Sec. 2.3).

Nodes are per-gene features of the noisy HR maps: every gene's map goes separately through one shared
small encoder to a ``node_size x node_size`` map, flattened to C values. One graph-convolution layer
mixes the genes along the co-expression matrix I:

    F_mid = SiLU(I F W_g),    F_out = alpha F_mid + (1 - alpha) F.

F_out is turned back into one low-resolution map per gene and upsampled to the HR grid, where it joins
the U-Net input as N extra channels.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffst.errors import InputError

__all__ = ["coexpression_matrix", "GeneCorrelationGraph"]


def _bin_chunks(data: np.ndarray, chunk_bins: int) -> Iterator[np.ndarray]:
    """Yield (bins, N) float64 chunks of clipped, NaN-free counts without copying the whole array."""
    if data.ndim == 4:
        tiles_per_chunk = max(1, chunk_bins // max(1, data.shape[2] * data.shape[3]))
        for start in range(0, data.shape[0], tiles_per_chunk):
            block = data[start : start + tiles_per_chunk]
            yield _clean(np.moveaxis(block, 1, -1).reshape(-1, data.shape[1]))
    else:
        for start in range(0, data.shape[0], chunk_bins):
            yield _clean(data[start : start + chunk_bins])


def _clean(table: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(table.astype(np.float64)), 0.0, None)


def coexpression_matrix(hr_counts: np.ndarray, normalize: bool = True, chunk_bins: int = 65536) -> np.ndarray:
    """Co-expression intensity matrix I of N genes, computed from HR expression data.

    Definitions (counts per bin x_{b,i} >= 0; negative values are clipped to 0):

    * co-expressed amount of genes i and j: ``c_ij = sum_b min(x_{b,i}, x_{b,j})``, the counts the two
      genes share bin by bin;
    * relative expression intensity of gene i given gene j: ``p(i|j) = c_ij / sum_b x_{b,j}``, the
      fraction of gene j's counts that are matched by gene i in the same bins (0 if gene j is absent);
    * ``I_ij = (p(i|j) + p(j|i)) / 2``: symmetric, in [0, 1], 1 on the diagonal, 0 for genes that never
      occur in the same bin.

    With ``normalize`` the matrix is scaled symmetrically, ``D^-1/2 I D^-1/2`` with D the row sums, so
    that it stays symmetric while message passing keeps feature magnitudes bounded (its largest
    eigenvalue is 1). The computation is deterministic.

    Parameters
    ----------
    hr_counts
        (T, N, H, W) HR maps of T tiles, or (bins, N) a table of bins by genes.
    normalize
        Apply the symmetric normalisation.
    chunk_bins
        Bins processed at once (bounds memory).

    Returns
    -------
    np.ndarray
        (N, N) float64 matrix.
    """
    data = np.asarray(hr_counts)
    if data.ndim not in (2, 4):
        raise InputError(f"hr_counts must be (T, N, H, W) or (bins, N), got shape {data.shape}")
    n_genes = data.shape[1]
    shared = np.zeros((n_genes, n_genes))
    totals = np.zeros(n_genes)
    for chunk in _bin_chunks(data, chunk_bins):
        totals += chunk.sum(axis=0)
        for i in range(n_genes):
            shared[i] += np.minimum(chunk[:, i : i + 1], chunk).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_given = np.where(totals[None, :] > 0, shared / totals[None, :], 0.0)  # p(i|j) at [i, j]
    intensity = 0.5 * (p_given + p_given.T)
    np.fill_diagonal(intensity, 1.0)
    if normalize:
        inv_sqrt = 1.0 / np.sqrt(intensity.sum(axis=1))
        intensity = intensity * inv_sqrt[:, None] * inv_sqrt[None, :]
    return intensity


class GeneCorrelationGraph(nn.Module):
    """One graph-convolution layer over genes, on compact per-gene features of the noisy maps.

    Parameters
    ----------
    n_genes
        Number of genes N (graph nodes).
    node_size
        Side of each node's feature map; C = node_size ** 2 (paper: 26 -> 676).
    hidden
        Channels of the shared per-gene encoder.
    alpha
        Graph balancing weight.
    """

    def __init__(self, n_genes: int, node_size: int, hidden: int, alpha: float):
        super().__init__()
        self.n_genes = n_genes
        self.node_size = node_size
        self.alpha = alpha
        # Stride 2: nodes are pooled to node_size x node_size anyway, so full resolution would be wasted.
        self.gene_encoder = nn.Sequential(nn.Conv2d(1, hidden, 3, stride=2, padding=1), nn.SiLU())
        self.gene_reduce = nn.Conv2d(hidden, 1, 1)
        node_dim = node_size * node_size
        self.weight = nn.Linear(node_dim, node_dim, bias=False)
        # Identity adjacency until real co-expression is set from training data.
        self.register_buffer("coexpression", torch.eye(n_genes))

    def set_coexpression(self, matrix: np.ndarray | Tensor) -> None:
        """Store the (N, N) co-expression matrix I used as adjacency (e.g. from ``coexpression_matrix``)."""
        matrix = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, Tensor) else matrix)
        if matrix.shape != (self.n_genes, self.n_genes):
            raise InputError(f"co-expression matrix must be ({self.n_genes}, {self.n_genes}), got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise InputError("co-expression matrix has non-finite entries")
        self.coexpression.copy_(matrix.to(self.coexpression))

    def forward(self, x_t: Tensor) -> Tensor:
        """(B, N, H, W) noisy maps -> (B, N, H, W) graph-refined per-gene maps."""
        b, n, height, width = x_t.shape
        per_gene = self.gene_encoder(x_t.reshape(b * n, 1, height, width))
        # Pool before reducing channels: pooling is linear and this order is the cheap one.
        nodes = self.gene_reduce(F.adaptive_avg_pool2d(per_gene, self.node_size)).reshape(b, n, -1)
        adjacency = self.coexpression.to(nodes.dtype)
        mid = F.silu(self.weight(torch.einsum("ij,bjc->bic", adjacency, nodes)))
        out = self.alpha * mid + (1 - self.alpha) * nodes
        out = out.reshape(b, n, self.node_size, self.node_size)
        return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
