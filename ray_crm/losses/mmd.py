"""MMD between the bins of a spurious variable Z: the causal reward model's independence penalty.

Every bin pair is scored from one N x N kernel matrix: an `index_add` folds it into the M x M matrix of
per-bin-pair kernel sums, from which all pairwise MMD^2 follow in closed form. The cost is O(N^2 + M^2) tensor
work with no Python loop over bins, where the seed's double loop launches O(M^2) small kernels every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class MMDConfig:
    """How the penalty is computed.

    bandwidth: RBF sigma. A float; "median" (the median pairwise distance of the pooled batch, recomputed
        every call, carrying no gradient); or a sequence of floats, a mixture whose kernel is the mean of the
        RBF kernels (robust when the reward scale drifts during training).
    unbiased: the U-statistic (within-bin terms skip i == j; can dip below 0) instead of the biased
        V-statistic (always >= 0, the seed's choice).
    reduction: "sum" over bin pairs (the paper: lambda * sum over pairs) or "mean" (what the seed's code does).
    num_bins: bin ids lie in [0, num_bins); None infers max id + 1, at the price of a host sync.
    standardize: the penalty is s * MMD^2(standardized values), s the values' pooled spread taken as a constant.
        MMD^2 of the standardized values (centred, divided by s with gradient) is invariant to the reward
        scale, so its gradient has no part that shrinks the rewards, while on raw values a fixed bandwidth is
        met by shrinking every reward towards a constant (the kernel of tiny values is 1 everywhere). The
        constant factor s keeps the gradient's size independent of the scale: without it the gradient grows as
        1 / s and, at the small rewards of a freshly initialised head, drowns the Bradley-Terry loss.
    z_kernel: how values of Z are compared. "bins" (the paper): MMD^2 between every pair of bins of Z, Z taken as
        equal inside a bin. "rbf": HSIC with a Gaussian kernel on Z's measured values (`z_dependence`), so a
        dependence inside a bin counts too; `unbiased` and `reduction` are about bin pairs and must keep their
        defaults.
    """

    bandwidth: float | Sequence[float] | Literal["median"] = "median"
    unbiased: bool = False
    reduction: Literal["sum", "mean"] = "sum"
    num_bins: int | None = None
    standardize: bool = False
    z_kernel: Literal["bins", "rbf"] = "bins"

    def __post_init__(self) -> None:
        bw = self.bandwidth
        if isinstance(bw, str):
            if bw != "median":
                raise ValueError(f"bandwidth must be a float, a list of floats or 'median', got {bw!r}")
        else:
            sigmas = (float(bw),) if isinstance(bw, int | float) else tuple(float(s) for s in bw)
            if not sigmas or min(sigmas) <= 0:
                raise ValueError(f"bandwidths must be positive and at least one, got {bw!r}")
            object.__setattr__(self, "bandwidth", sigmas)  # normalised: a tuple of floats
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.z_kernel not in ("bins", "rbf"):
            raise ValueError(f"z_kernel must be 'bins' or 'rbf', got {self.z_kernel!r}")
        if self.z_kernel == "rbf" and (self.unbiased or self.reduction != "sum"):
            raise ValueError("unbiased and reduction weigh pairs of bins; z_kernel='rbf' has none: keep the defaults")
        if self.num_bins is not None and self.num_bins < 0:
            raise ValueError(f"num_bins must be >= 0, got {self.num_bins}")


@dataclass
class MMDStats:
    """Diagnostics of one penalty evaluation, as detached tensors; summaries are formed only when logged."""

    bin_counts: Tensor  # [M] samples per bin id; negative ids are not counted
    pair_mmd: Tensor  # [M, M] MMD^2 of every bin pair, meaningful where `pairs`
    bandwidth: Tensor  # the sigma(s) used

    @property
    def pairs(self) -> Tensor:
        """[M, M] bool, upper triangle: the bin pairs in the penalty (both bins hold >= 2 samples)."""
        used = self.bin_counts >= 2
        return torch.triu(used[:, None] & used[None, :], diagonal=1)

    def metrics(self, prefix: str = "mmd/") -> dict[str, Tensor]:
        pairs = self.pairs
        n_pairs = pairs.sum()
        worst = torch.where(pairs, self.pair_mmd, -torch.inf).amax() if pairs.numel() else n_pairs * 0.0
        return {
            f"{prefix}pairs": n_pairs,
            f"{prefix}bins_used": (self.bin_counts >= 2).sum(),
            f"{prefix}bins_skipped": (self.bin_counts == 1).sum(),  # an MMD needs >= 2 samples per side
            f"{prefix}max_pair": torch.where(n_pairs > 0, worst, 0.0),  # the worst-separated bins
            f"{prefix}bin_counts": self.bin_counts,
        }


def _sq_dists(x: Tensor) -> Tensor:
    """Pairwise squared distances in one fresh N x N buffer: exact differences for scalars, the Gram expansion
    for (centred) vectors."""
    if x.dim() == 1:
        return (x[:, None] - x[None, :]).square_()
    sq = x.square().sum(1)
    return torch.addmm(sq[:, None], x, x.T, alpha=-2).add_(sq).clamp_min_(0).fill_diagonal_(0)


def _median_sigma(d2: Tensor) -> Tensor:
    """Median heuristic: the median distance over the distinct pairs of the pooled batch."""
    pairs = d2.masked_select(torch.ones_like(d2, dtype=torch.bool).triu_(1))
    if pairs.numel() == 0:
        return d2.new_ones(())
    # sqrt is monotone, so sqrt(median d^2) is the median distance. When most values coincide the median is 0:
    # fall back to the RMS distance so that distinct values keep a usable kernel (and a gradient).
    med = pairs.median()
    return torch.where(med > 0, med, pairs.mean()).sqrt().clamp_min(torch.finfo(d2.dtype).eps)


def _rbf(d2: Tensor, coefs: list[float] | list[Tensor]) -> tuple[Tensor, Tensor, float | Tensor]:
    """The kernel k = mean_l exp(c_l d^2), c_l = -1 / (2 sigma_l^2), and its slope dk/d(d^2) = scale * slope.

    One bandwidth works in place on d2 (slope = k, scale = c): a single N x N buffer in flight.
    """
    if len(coefs) == 1:
        k = d2.mul_(coefs[0]).exp_()
        return k, k, coefs[0]
    k, slope = torch.zeros_like(d2), torch.zeros_like(d2)
    for c in coefs:
        e = d2.mul(c).exp_()
        k.add_(e)
        slope.add_(e.mul_(c))
    return k.div_(len(coefs)), slope.div_(len(coefs)), 1.0


def _row_sums(k: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """[M, N]: out[m, i] = sum of k[j, i] over j in bin m (a row-wise index_add, the fast direction)."""
    return k.new_zeros(num_bins, k.shape[1]).index_add_(0, bins, k)


class _BinnedMMD(torch.autograd.Function):
    """The penalty as one autograd node whose gradient is formed in the forward pass.

    The penalty is linear in the kernel, with weights set by the bin counts alone, so dP/dx is known as soon
    as the kernel is. Forming it at once lets the kernel buffer be reused in place and freed: for scalar rewards
    one N x N buffer per call and ~7 passes over it, where autograd keeps three, makes ~20 passes and records
    ~60 small ops.
    On one CPU thread, fresh N x N buffers (page faults) and per-op overhead, not arithmetic, dominate.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bins: Tensor, num_bins: int, cfg: MMDConfig, need_grad: bool):
        valid = bins >= 0
        counts = torch.bincount(bins[valid], minlength=num_bins)
        if counts.numel() > num_bins:
            raise ValueError(f"bin id {int(bins.max())} out of range for num_bins={num_bins}")
        used = counts >= 2
        keep = torch.cat([used, used.new_zeros(1)])[torch.where(valid, bins, num_bins)]  # id < 0: never used
        idx = keep.nonzero().squeeze(1)  # this sync also makes the used-bin count free below
        xk, bk = x.index_select(0, idx), bins.index_select(0, idx)
        xk = xk - xk.mean(0)  # distances ignore it; it spares the gradient's x_i * sum_j h_ij - sum_j h_ij x_j
        d2 = _sq_dists(xk)
        if cfg.bandwidth == "median":
            sigmas = _median_sigma(d2)[None]
            coefs = [-0.5 / sigmas[0].square()]
        else:
            sigmas, coefs = d2.new_tensor(cfg.bandwidth), [-0.5 / sigma**2 for sigma in cfg.bandwidth]
        k, slope, scale = _rbf(d2, coefs)
        k_rows = _row_sums(k, bk, num_bins)
        s = k.new_zeros(num_bins, num_bins).index_add_(1, bk, k_rows)  # s[m, m'] = sum k[i in m, j in m']

        # Kernel means over used bins (q = 1/n there, 0 elsewhere): between bins s q q^T; within bin m a_m s[m, m]
        # for the V-statistic, a_m (s[m, m] - n_m) for the U-statistic (k[i, i] = 1 left out).
        n = counts.to(s.dtype)
        q = used / n.clamp_min(1)
        a = q / (n - 1).clamp_min(1) if cfg.unbiased else q.square()
        within = a * (s.diagonal() - n if cfg.unbiased else s.diagonal())
        qq = torch.outer(q, q)
        mmd = (within[:, None] + within[None, :]).sub_(s * qq, alpha=2)
        # Summing per-pair MMDs, not the algebraically equal (U - 1) sum(within) - sum(off-diagonal cross),
        # avoids cancelling O(M^2) terms in fp32.
        u = int(used.sum())  # free: the nonzero above already synced
        r = 1 / max(u * (u - 1) // 2, 1) if cfg.reduction == "mean" else 1.0
        penalty = torch.where(torch.triu(used[:, None] & used[None, :], diagonal=1), mmd, 0).sum() * r
        ctx.mark_non_differentiable(counts, mmd, sigmas)
        outputs = penalty, counts, mmd, sigmas
        if not need_grad:
            return outputs

        # Each within-term enters U - 1 pairs, so penalty = sum_ij w[b_i, b_j] k_ij + const with the symmetric
        # w = r (diag((U - 1) a + q^2) - q q^T); as d(d^2_ij)/dx_i = 2 (x_i - x_j),
        # dP/dx_i = 4 sum_j w[b_i, b_j] dk_ij/d(d^2) (x_i - x_j).
        w = torch.diag((u - 1) * a + q.square()).sub_(qq).mul_(4 * r * scale)
        if xk.dim() == 1:  # group the sum over j by bin: [M, N] row sums, no N x N temporary
            rows = k_rows if slope is k else _row_sums(slope, bk, num_bins)
            rows_x = _row_sums(slope.mul_(xk[:, None]), bk, num_bins)  # slope is symmetric
            g = (w.index_select(0, bk) * (xk * rows - rows_x).T).sum(1)
        else:
            h = slope.mul_(w.index_select(1, bk).index_select(0, bk))  # row gathers are the fast ones
            g = xk * h.sum(1, keepdim=True) - h @ xk
        ctx.save_for_backward(idx, g)
        ctx.n = len(x)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, *_non_differentiable: Tensor):
        idx, g = ctx.saved_tensors
        return g.new_zeros((ctx.n, *g.shape[1:])).index_copy_(0, idx, g * grad), None, None, None, None


def standardized(values: Tensor, valid: Tensor, floor: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(values - mean) / spread over the rows where `valid`, and the spread: the std of scalars, or the RMS
    distance to the mean of vectors. The floor keeps an all-equal batch finite, gradient included: it bounds the
    square before the root, whose derivative at 0 is infinite (times clamp's zero: NaN). DPO's implicit rewards
    all start at exactly 0 (pi = pi_ref)."""
    kept = values[valid]
    if kept.shape[0] < 2:
        return values, values.new_ones(())
    centred = values - kept.mean(0)
    spread = centred[valid].square().reshape(kept.shape[0], -1).sum(1).mean().clamp_min(floor**2).sqrt()
    return centred / spread, spread


def binned_mmd_penalty(values: Tensor, bins: Tensor, cfg: MMDConfig = MMDConfig()) -> tuple[Tensor, MMDStats]:
    """Sum (or mean) of MMD^2 over all pairs of bins, from one batched computation.

    values: [N] scalar rewards or [N, D] representations (any float dtype; the kernel runs in >= fp32).
    bins: [N] integer bin ids; negative ids (unknown Z) are ignored; bins with < 2 samples are skipped.
    With cfg.standardize the values are standardized over the valid rows first and the sum is multiplied by
    their spread, held constant (see MMDConfig); the stats' per-pair MMD^2 are then in standardized units.
    MMD^2 rather than MMD is penalised, as in the seed: it is smooth where the bins already agree, MMD is not.
    """
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() not in (1, 2) or bins.shape != values.shape[:1]:
        raise ValueError(f"values must be [N] or [N, D] with bins [N]; got {tuple(values.shape)}, {tuple(bins.shape)}")
    bins = bins.long()
    num_bins = cfg.num_bins if cfg.num_bins is not None else max(int(bins.max()) + 1, 0) if bins.numel() else 0
    x = values.to(torch.promote_types(values.dtype, torch.float32))
    scale = None
    if cfg.standardize:
        x, scale = standardized(x, bins >= 0)
    need_grad = torch.is_grad_enabled() and x.requires_grad
    penalty, counts, mmd, sigmas = _BinnedMMD.apply(x, bins, num_bins, cfg, need_grad)
    if scale is not None:
        penalty = penalty * scale.detach()
    return penalty, MMDStats(bin_counts=counts, pair_mmd=mmd, bandwidth=sigmas)


def mmd2(a: Tensor, b: Tensor, cfg: MMDConfig = MMDConfig()) -> Tensor:
    """MMD^2 between two samples of >= 2 points each ([n] or [n, D]): the penalty with two bins."""
    bins = torch.cat([a.new_zeros(len(a), dtype=torch.long), a.new_ones(len(b), dtype=torch.long)])
    return binned_mmd_penalty(torch.cat([a, b]), bins, replace(cfg, num_bins=2, reduction="sum"))[0]


def z_dependence(values: Tensor, z: Tensor, cfg: MMDConfig = MMDConfig()) -> tuple[Tensor, Tensor]:
    """HSIC between the values and Z's measured values: the penalty of `z_kernel="rbf"`, and the bandwidth on Z.

    HSIC = sum_ij (H K H)_ij L_ij / N^2 with K the kernel on the values (cfg.bandwidth, as for the binned MMD), L a
    Gaussian kernel on Z standardized per column (median-heuristic bandwidth) and H the centring matrix. With
    L_ij = 1[bin_i == bin_j] instead it is a weighted sum of the bins' MMD^2 against the pooled batch (M equal
    bins: the binned penalty / M^3), blind to any dependence inside a bin, the top bin's open end included. Z is
    data, so it carries no gradient.
    values: [N] or [N, D]; z: [N] or [N, K] numbers; rows with a non-finite Z, and batches of < 2 rows, add 0.
    With cfg.standardize the values are standardized first and the statistic multiplied by their spread held
    constant, as for the binned penalty (see MMDConfig).
    """
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    z = z.reshape(len(z), -1).to(torch.promote_types(values.dtype, torch.float32)).detach()
    if values.dim() not in (1, 2) or len(z) != len(values):
        raise ValueError(f"values must be [N] or [N, D] with z [N] or [N, K]; got {tuple(values.shape)}, {tuple(z.shape)}")
    valid = torch.isfinite(z).all(1)
    x, z = values[valid].to(z.dtype), z[valid]
    n = len(x)
    if n < 2:
        return x.sum() * 0, z.new_ones(())
    scale = None
    if cfg.standardize:
        x, scale = standardized(x, torch.ones(n, dtype=torch.bool, device=x.device))
    z = (z - z.mean(0)) / z.std(0).clamp_min(torch.finfo(z.dtype).eps)
    x2 = x[:, None] if x.dim() == 1 else x
    d2 = (x2[:, None] - x2[None, :]).square().sum(-1)  # exact differences: no sqrt, whose gradient at 0 is NaN
    dz = (z[:, None] - z[None, :]).square().sum(-1)
    sigma_z = _median_sigma(dz)
    bws = [_median_sigma(d2.detach())] if cfg.bandwidth == "median" else cfg.bandwidth
    k = torch.stack([torch.exp(d2 / (-2 * sigma**2)) for sigma in bws]).mean(0)
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    hsic = (kc * torch.exp(dz / (-2 * sigma_z**2))).sum() / n**2
    return (hsic if scale is None else hsic * scale.detach()), sigma_z
