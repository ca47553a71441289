"""The batched MMD penalty against the seed's double loop over bin pairs, plus its invariances and edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ray_crm.losses import MMDConfig, binned_mmd_penalty, mmd2, z_dependence

KERNELS = [1.0, "median", (0.5, 1.0, 2.0)]


def reference_penalty(values: torch.Tensor, bins: torch.Tensor, cfg: MMDConfig) -> torch.Tensor:
    """The seed's code, generalised to our options: a Python double loop over bins, one small kernel per pair."""
    x = values if values.dim() == 2 else values[:, None]
    num_bins = cfg.num_bins if cfg.num_bins is not None else int(bins.max()) + 1
    groups = [x[bins == m] for m in range(num_bins)]
    groups = [g for g in groups if len(g) >= 2]
    if cfg.bandwidth == "median":
        dist = torch.pdist(torch.cat(groups).detach()) if groups else torch.ones(1, dtype=x.dtype)
        med = dist.median()
        sigmas = [torch.where(med > 0, med, dist.square().mean().sqrt())]
    else:
        sigmas = list(cfg.bandwidth)

    def kernel(a, b):
        d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        return sum(torch.exp(-d2 / (2 * s**2)) for s in sigmas) / len(sigmas)

    def within(a):
        if cfg.unbiased:
            return (kernel(a, a).sum() - len(a)) / (len(a) * (len(a) - 1))
        return kernel(a, a).mean()

    terms = [within(a) + within(b) - 2 * kernel(a, b).mean() for a, b in itertools.combinations(groups, 2)]
    if not terms:
        return x.sum() * 0
    total = sum(terms)
    return total / len(terms) if cfg.reduction == "mean" else total


def _inputs(n: int, m: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if dim == 0 else (n, dim)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    bins = torch.randint(-1, m, (n,), generator=g)  # -1: unknown Z, ignored
    return values, bins


def _value_and_grad(fn, values, *args):
    values = values.clone().requires_grad_(True)
    out = fn(values, *args)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out, values)
    return out.detach(), grad


SIZES = [(16, 2), (64, 10), (120, 30)]
CASES = []  # every kernel x estimator x shape, cycling through batch sizes, bin counts and reductions
for i, ((name, bandwidth), unbiased, dim) in enumerate(
    itertools.product(zip(["fixed", "median", "mixture"], KERNELS), [False, True], [0, 3])
):
    (n, m), reduction = SIZES[i % 3], ("sum", "mean")[i % 2]
    case_id = f"N{n}-M{m}-{name}-{'unbiased' if unbiased else 'biased'}-{reduction}-D{dim}"
    CASES.append(pytest.param(n, m, bandwidth, unbiased, reduction, dim, id=case_id))


@pytest.mark.parametrize("n,m,bandwidth,unbiased,reduction,dim", CASES)
def test_matches_seed_double_loop(n, m, bandwidth, unbiased, reduction, dim):
    cfg = MMDConfig(bandwidth=bandwidth, unbiased=unbiased, reduction=reduction, num_bins=m)
    values, bins = _inputs(n, m, dim, seed=n * 100 + m + dim)
    got, got_grad = _value_and_grad(binned_mmd_penalty, values, bins, cfg)
    want, want_grad = _value_and_grad(reference_penalty, values, bins, cfg)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)


def test_stats_report_counts_pairs_skips_and_worst_pair():
    values = torch.tensor([0.0, 0.1, 3.0, 3.2, 5.0, 1.0, 1.1, 7.0], dtype=torch.float64)
    bins = torch.tensor([0, 0, 1, 1, 2, 3, 3, -1])
    penalty, stats = binned_mmd_penalty(values, bins, MMDConfig(bandwidth=1.0, num_bins=5))
    metrics = stats.metrics()
    assert stats.bin_counts.tolist() == [2, 2, 1, 2, 0]
    assert int(metrics["mmd/pairs"]) == 3 and int(metrics["mmd/bins_used"]) == 3
    assert int(metrics["mmd/bins_skipped"]) == 1
    fixed = MMDConfig(bandwidth=1.0)
    pair_values = [mmd2(values[bins == a], values[bins == b], fixed) for a, b in [(0, 1), (0, 3), (1, 3)]]
    torch.testing.assert_close(metrics["mmd/max_pair"], max(pair_values))
    torch.testing.assert_close(penalty, sum(pair_values))
    kept = torch.isin(bins, torch.tensor([0, 1, 3]))
    torch.testing.assert_close(penalty, reference_penalty(values[kept], bins[kept], fixed))


def test_inferred_num_bins_matches_given():
    values, bins = _inputs(50, 7, 0, seed=3)
    inferred, _ = binned_mmd_penalty(values, bins, MMDConfig())
    given_, _ = binned_mmd_penalty(values, bins, MMDConfig(num_bins=int(bins.max()) + 1))
    assert torch.equal(inferred, given_)


@pytest.mark.parametrize(
    "bins", [torch.full((6,), -1), torch.tensor([0, 1, 2, 3, 4, 5]), torch.zeros(6, dtype=torch.long)]
)
def test_no_usable_pair_gives_zero_and_a_zero_gradient(bins):
    values = torch.randn(6, requires_grad=True)
    penalty, stats = binned_mmd_penalty(values, bins)
    penalty.backward()
    assert penalty.item() == 0.0 and int(stats.metrics()["mmd/pairs"]) == 0
    assert float(stats.metrics()["mmd/max_pair"]) == 0.0
    assert torch.equal(values.grad, torch.zeros(6))


def test_empty_batch():
    penalty, stats = binned_mmd_penalty(torch.zeros(0), torch.zeros(0, dtype=torch.long), MMDConfig(num_bins=3))
    assert penalty.item() == 0.0 and stats.bin_counts.tolist() == [0, 0, 0]


def test_out_of_range_bin_raises():
    with pytest.raises(ValueError, match="out of range"):
        binned_mmd_penalty(torch.randn(4), torch.tensor([0, 1, 5, 1]), MMDConfig(num_bins=3))


@pytest.mark.parametrize("kwargs", [{"bandwidth": "mean"}, {"bandwidth": 0.0}, {"bandwidth": []}, {"reduction": "max"}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        MMDConfig(**kwargs)


def test_config_normalises_bandwidths_to_tuples():
    assert MMDConfig(bandwidth=2).bandwidth == (2.0,)
    assert MMDConfig(bandwidth=[0.5, 1]).bandwidth == (0.5, 1.0)


def test_median_guard_when_most_values_coincide():
    values = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0], requires_grad=True)
    bins = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    penalty, stats = binned_mmd_penalty(values, bins)
    penalty.backward()
    assert float(stats.bandwidth) > 0 and torch.isfinite(penalty)
    assert torch.isfinite(values.grad).all() and values.grad.abs().sum() > 0


def test_median_guard_when_all_values_coincide():
    values = torch.ones(8, requires_grad=True)
    penalty, _ = binned_mmd_penalty(values, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    penalty.backward()
    assert penalty.item() == 0.0 and torch.equal(values.grad, torch.zeros(8))


def test_bf16_values_use_an_fp32_kernel():
    values, bins = _inputs(64, 6, 0, seed=5)
    low = values.to(torch.bfloat16).requires_grad_(True)
    penalty, _ = binned_mmd_penalty(low, bins)
    penalty.backward()
    assert penalty.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(penalty, reference_penalty(low.detach().double(), bins, MMDConfig()).float())


def test_large_reward_offset_is_stable_in_fp32():
    values, bins = _inputs(200, 10, 0, seed=7)
    want, want_grad = _value_and_grad(binned_mmd_penalty, values + 1e4, bins)
    got, got_grad = _value_and_grad(binned_mmd_penalty, (values + 1e4).float(), bins)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-2, atol=1e-4)


def test_fp32_keeps_precision_with_many_bins():
    values, bins = _inputs(1200, 60, 0, seed=11)
    want, want_grad = _value_and_grad(binned_mmd_penalty, values, bins)
    got, got_grad = _value_and_grad(binned_mmd_penalty, values.float(), bins)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-3, atol=1e-6)


def test_no_graph_without_grad():
    values = torch.randn(20, requires_grad=True)
    with torch.no_grad():
        penalty, _ = binned_mmd_penalty(values, torch.arange(20) % 4)
    assert not penalty.requires_grad


# ---- properties -------------------------------------------------------------------------------------------

samples = st.lists(st.tuples(st.floats(-4, 4, allow_nan=False, width=32), st.integers(-1, 5)), min_size=2, max_size=40)
configs = st.builds(
    MMDConfig,
    bandwidth=st.sampled_from(KERNELS),
    unbiased=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
    num_bins=st.just(6),
)
PROPERTY = settings(max_examples=50, deadline=None)


def _tensors(batch):
    values, bins = zip(*batch)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(bins)


@PROPERTY
@given(batch=samples, cfg=configs, data=st.data())
def test_invariant_to_permuting_the_batch(batch, cfg, data):
    values, bins = _tensors(batch)
    perm = torch.tensor(data.draw(st.permutations(range(len(batch)))))
    a, _ = binned_mmd_penalty(values, bins, cfg)
    b, _ = binned_mmd_penalty(values[perm], bins[perm], cfg)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(batch=samples, cfg=configs, labels=st.permutations(range(6)))
def test_invariant_to_relabelling_bins(batch, cfg, labels):
    values, bins = _tensors(batch)
    relabelled = torch.where(bins >= 0, torch.tensor(labels)[bins.clamp_min(0)], bins)
    a, _ = binned_mmd_penalty(values, bins, cfg)
    b, _ = binned_mmd_penalty(values, relabelled, cfg)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(batch=samples, bandwidth=st.sampled_from(KERNELS))
def test_biased_mmd_is_nonnegative(batch, bandwidth):
    values, bins = _tensors(batch)
    penalty, stats = binned_mmd_penalty(values, bins, MMDConfig(bandwidth=bandwidth, num_bins=6))
    assert penalty >= -1e-12
    assert (stats.pair_mmd[stats.pairs] >= -1e-12).all()


@PROPERTY
@given(
    values=st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=30), bin_id=st.integers(0, 5), cfg=configs
)
def test_zero_when_all_samples_share_one_bin(values, bin_id, cfg):
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    penalty, _ = binned_mmd_penalty(x, torch.full((len(values),), bin_id), cfg)
    penalty.backward()
    assert penalty.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@PROPERTY
@given(batch=samples, cfg=configs)
def test_gradients_reach_the_rewards(batch, cfg):
    values, bins = _tensors(batch)
    values.requires_grad_(True)
    penalty, _ = binned_mmd_penalty(values, bins, cfg)
    assume(abs(penalty.item()) > 1e-3)
    penalty.backward()
    assert torch.isfinite(values.grad).all() and values.grad.abs().sum() > 0
    assert torch.equal(values.grad[bins < 0], torch.zeros(int((bins < 0).sum()), dtype=torch.float64))


# ---------------------------------------------------------------- standardized: a penalty shrinking cannot meet


def _shifted_bins(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bins = torch.arange(n) % 4
    return torch.randn(n, generator=g, dtype=torch.float64) + 0.5 * bins, bins


@pytest.mark.parametrize("bandwidth", KERNELS)
def test_standardized_penalty_has_no_incentive_to_shrink(bandwidth):
    """The standardized MMD^2 is the same at every scale and offset; the penalty is it times the spread, so its
    size (and its gradient's) follows the rewards' scale instead of exploding as they get small."""
    x, bins = _shifted_bins()
    cfg = MMDConfig(bandwidth=bandwidth, standardize=True)
    base, stats = binned_mmd_penalty(x, bins, cfg)
    for scale, shift in ((1e-3, 0.0), (0.05, 3.0), (40.0, -2.0)):
        penalty, scaled = binned_mmd_penalty(scale * x + shift, bins, cfg)
        assert torch.allclose(scaled.pair_mmd, stats.pair_mmd, rtol=1e-9, atol=1e-12)
        assert torch.allclose(penalty, scale * base, rtol=1e-9)
    raw = MMDConfig(bandwidth=(0.5, 1.0, 2.0))  # the raw penalty is won by shrinking: the failure this fixes
    assert binned_mmd_penalty(1e-3 * x, bins, raw)[0] < 1e-4 * binned_mmd_penalty(x, bins, raw)[0]


def test_standardized_gradient_size_does_not_grow_as_rewards_shrink():
    x, bins = _shifted_bins()
    norms = []
    for scale in (1e-2, 1.0, 1e2):
        v = (scale * x).requires_grad_(True)
        binned_mmd_penalty(v, bins, MMDConfig(bandwidth=(0.5, 1.0, 2.0), standardize=True))[0].backward()
        norms.append(float(v.grad.norm()))
    assert norms == pytest.approx([norms[0]] * 3, rel=1e-6)


def test_standardized_gradient_has_no_shrinking_or_shifting_part():
    """Scale and offset invariance: the gradient is orthogonal to (x - mean) and to the all-ones direction."""
    x, bins = _shifted_bins()
    x.requires_grad_(True)
    binned_mmd_penalty(x, bins, MMDConfig(bandwidth=(0.5, 1.0, 2.0), standardize=True))[0].backward()
    g, centred = x.grad, (x - x.mean()).detach()
    assert g.norm() > 1e-3
    assert abs(float(g @ centred)) < 1e-9 * float(g.norm() * centred.norm())
    assert abs(float(g.sum())) < 1e-9 * float(g.norm())


def test_standardized_is_the_spread_times_the_raw_penalty_of_standardized_values():
    x, bins = _shifted_bins(seed=1)
    bins = torch.where(torch.arange(len(bins)) % 7 == 0, -1, bins)  # unknown Z: left out of the statistics too
    valid = bins >= 0
    spread = x[valid].std(unbiased=False)
    z = (x - x[valid].mean()) / spread
    cfg = MMDConfig(bandwidth=(0.5, 1.0, 2.0))
    got = binned_mmd_penalty(x, bins, MMDConfig(bandwidth=(0.5, 1.0, 2.0), standardize=True))[0]
    assert torch.allclose(got, spread * binned_mmd_penalty(z, bins, cfg)[0], rtol=1e-9)


@pytest.mark.parametrize("value", [0.3, 0.0])  # 0.0: DPO's implicit rewards at the start, a spread of exactly 0
def test_standardized_all_equal_values_stay_finite(value):
    x = torch.full((8,), value, requires_grad=True)
    penalty = binned_mmd_penalty(x, torch.arange(8) % 2, MMDConfig(bandwidth=1.0, standardize=True))[0]
    penalty.backward()
    assert torch.isfinite(penalty) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- z_kernel="rbf": HSIC against Z's measured values


def reference_hsic(x: torch.Tensor, z: torch.Tensor, sigmas) -> float:
    """The textbook biased HSIC, tr(K H L H) / n^2, with L an RBF on per-column standardized Z whose bandwidth is
    the median pairwise distance; numpy, written apart from the module."""
    import numpy as np

    x, z = x.detach().numpy().reshape(len(x), -1), z.numpy().reshape(len(z), -1)
    z = (z - z.mean(0)) / z.std(0, ddof=1)
    dx = ((x[:, None] - x[None]) ** 2).sum(-1)
    dz = ((z[:, None] - z[None]) ** 2).sum(-1)
    pairs = np.sort(np.sqrt(dz[np.triu_indices(len(z), 1)]))
    sigma_z = pairs[(len(pairs) - 1) // 2]  # the lower median of an even count, as torch's median
    k = sum(np.exp(-dx / (2 * s**2)) for s in sigmas) / len(sigmas)
    h = np.eye(len(x)) - 1 / len(x)
    return float(np.trace(k @ h @ np.exp(-dz / (2 * sigma_z**2)) @ h)) / len(x) ** 2


@pytest.mark.parametrize("dim", [0, 3])
def test_z_dependence_is_textbook_hsic(dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((20,) if dim == 0 else (20, dim), generator=g, dtype=torch.float64)
    z = torch.randn(20, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 30.0], dtype=torch.float64)
    got, _ = z_dependence(x, z, MMDConfig(bandwidth=(0.5, 1.0, 2.0), z_kernel="rbf"))
    assert float(got) == pytest.approx(reference_hsic(x, z, (0.5, 1.0, 2.0)), rel=1e-9)


def test_z_dependence_detects_a_trend_past_the_top_bin_edge_more_surely_than_the_bins():
    """Rewards that rise with Z past the top bin's lower edge only (where a padded answer lands), batches of 32
    from a skewed Z: how many standard deviations of the independent case the mean penalty moves. The binned
    penalty sees the trend only through the top bin's spread; HSIC sees every difference of Z (here 2.1 against
    4.0 standard deviations; on the length benchmark's train lengths 0.8 against 2.7)."""
    g = torch.Generator().manual_seed(0)
    kernel = (0.5, 1.0, 2.0, 4.0)
    binned, by_value = MMDConfig(bandwidth=kernel, standardize=True, num_bins=3), MMDConfig(
        bandwidth=kernel, standardize=True, z_kernel="rbf")

    def penalties(strength: float) -> torch.Tensor:
        out = []
        for _ in range(150):
            z = torch.distributions.Gamma(4.0, 0.15).sample((32,))  # ~ answer lengths in tokens, mean ~27
            noise = torch.randn(32, generator=g, dtype=torch.float64)
            x = strength * (z - 28).clamp_min(0).double() / 8 + noise
            bins = torch.bucketize(z, torch.tensor([18.0, 28.0]), right=True)
            out.append([float(binned_mmd_penalty(x, bins, binned)[0]), float(z_dependence(x, z, by_value)[0])])
        return torch.tensor(out)

    torch.manual_seed(0)  # Z's draws
    null, trend = penalties(0.0), penalties(0.6)
    snr = (trend.mean(0) - null.mean(0)) / null.std(0)
    assert snr[1] > 1.5 * snr[0] and snr[1] > 3


def test_z_dependence_leaves_out_rows_of_unknown_z():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(16, generator=g, dtype=torch.float64)
    z[[2, 9]] = float("nan")
    cfg = MMDConfig(bandwidth=(0.5, 1.0), standardize=True, z_kernel="rbf")
    penalty, _ = z_dependence(x, z, cfg)
    keep = torch.isfinite(z)
    assert torch.allclose(penalty, z_dependence(x[keep], z[keep], cfg)[0], rtol=1e-12)
    (grad,) = torch.autograd.grad(penalty, x)
    assert torch.all(grad[~keep] == 0) and grad[keep].norm() > 0


def test_z_dependence_standardized_has_no_incentive_to_shrink_or_shift():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(24, generator=g, dtype=torch.float64)
    x = (z + torch.randn(24, generator=g, dtype=torch.float64)).requires_grad_(True)
    cfg = MMDConfig(bandwidth=(0.5, 1.0, 2.0), standardize=True, z_kernel="rbf")
    base, _ = z_dependence(x, z, cfg)
    for scale, shift in ((1e-3, 0.0), (40.0, -2.0)):
        assert torch.allclose(z_dependence(scale * x + shift, z, cfg)[0], scale * base, rtol=1e-9)
    (grad,) = torch.autograd.grad(base, x)
    centred = (x - x.mean()).detach()
    assert abs(float(grad @ centred)) < 1e-9 * float(grad.norm() * centred.norm())
    assert abs(float(grad.sum())) < 1e-9 * float(grad.norm())


def test_z_dependence_is_zero_for_a_constant_z_and_a_single_row():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    cfg = MMDConfig(bandwidth=1.0, standardize=True, z_kernel="rbf")
    assert abs(float(z_dependence(x, torch.full((12,), 7.0), cfg)[0])) < 1e-12
    one, _ = z_dependence(x[:1], torch.ones(1), cfg)
    assert float(one) == 0 and one.requires_grad


@pytest.mark.parametrize("kwargs", [{"unbiased": True}, {"reduction": "mean"}, {"z_kernel": "gaussian"}])
def test_rbf_config_rejects_bin_pair_settings(kwargs):
    with pytest.raises(ValueError):
        MMDConfig(**{"z_kernel": "rbf", **kwargs})
