"""Exit stealing from response times (paper §4.2), adversary 2's choice of stealer, and query planning (Eq. 1).

A sample that leaves at a deeper exit runs more of the network, so its response time is longer; the
per-sample latencies of many queries form one cluster per exit, ordered by depth. Repeats are reduced per
sample by a trimmed mean (20 % cut from each end) or by their minimum (the reference's choice); which one
works depends on whether the host's noise is two-sided (a quiet machine whose speed varies both ways) or
one-sided (queueing on a loaded one), so adversary 2 picks it per stealer by cross-validation on its
shadow. NaN repeats (adaptive querying, lost queries) are ignored everywhere. Stealers:

* :class:`KDEExitStealer` — unsupervised, the paper's adversary 2 made robust: a binned Gaussian KDE with
  the improved Sheather–Jones bandwidth (Botev et al., Ann. Statist. 2010), stragglers beyond the ``trim``
  quantiles left out of the fit, density minima merged away unless significant; the number of exits is
  discovered (or given). Clusters are numbered by latency rank ("kde-blind") or, with :meth:`~KDEExitStealer.align`,
  matched to a shadow deployment's per-exit latencies after removing the offset between the two stacks.
* :class:`SupervisedExitStealer` — a class-balanced classifier on robust features of all repeats, trained on
  shadow timings with known exits (the adversary owns the shadow deployment).
* :class:`ExitTimingModel` — a per-exit timing model (centre per exit, Student-t jitter per query) fitted on
  the shadow: a likelihood stealer with a posterior over exits, and the model of the sequential test that
  adaptive querying stops on (:func:`sequential_stop`, :func:`describe_jitter`).
* :func:`paper_kde_steal` — the reference implementation's fragile procedure, for comparison only.

Adversary 2 chooses among them by cross-validation on its own shadow timings (:func:`choose_stealer`),
removes the offset between shadow and target (:func:`estimate_offset`), and fits its hybrid attacks on the
shadow's cross-fitted *stolen* exits (:func:`cross_fit_exits`); :func:`steal_exits` does it all and
:func:`steal` keeps the older dict interface. Measured accuracies live in ``docs/results.md``, not here.
Plus :func:`ztest_queries` / :func:`plan_queries` (paper Eq. 1) and :func:`simulate_noisy_channel` (the
paper's MLaaS noise model).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from scipy import fft, optimize, signal, special, stats

from mexit._kde import binned_kde, linear_binning
from mexit.errors import InputError

logger = logging.getLogger(__name__)

Reduce = Literal["trimmed", "min", "median", "mean"]
TRIM = 0.2  # share of repeats cut from each end by the "trimmed" reduction
_MAX_GRID = 1 << 21


# ------------------------------------------------------------------------------------------ helpers
def reduce_latencies(latencies: np.ndarray, reduce: Reduce = "trimmed") -> np.ndarray:
    """Per-sample latency (n,) float64 from ``(n,)`` or ``(n, R)`` repeated measurements.

    ``trimmed`` (default): the mean of the repeats after cutting 20 % from each end (as
    ``scipy.stats.trim_mean`` does) — as robust as the median to a few stragglers (2 of 10 repeats), as
    efficient as the mean on the two-sided noise of a shared machine. ``min`` discards only positive
    noise (the paper's queueing model); ``median`` and ``mean`` for comparison.

    NaN entries are repeats that were never made (adaptive querying records a different number of
    repeats per sample, a lost query leaves a gap) and are ignored; every sample needs one finite repeat.
    """
    t = np.asarray(latencies, dtype=np.float64)
    if t.ndim not in (1, 2) or t.shape[0] == 0 or (t.ndim == 2 and t.shape[1] == 0):
        raise InputError(f"latencies must be a non-empty (n,) or (n, repeats) array, got shape {t.shape}")
    if np.isinf(t).any():
        raise InputError("latencies contain infinite values")
    finite = np.isfinite(t)
    if not (finite if t.ndim == 1 else finite.any(axis=1)).all():
        raise InputError("every sample needs at least one recorded latency (a row is all NaN)")
    if t.ndim == 1:
        return t
    if reduce == "trimmed":
        return _nan_trim_mean(t, TRIM)
    if reduce not in ("min", "median", "mean"):
        raise InputError(f"reduce must be 'trimmed', 'min', 'median' or 'mean', got {reduce!r}")
    if finite.all():
        return {"min": np.min, "median": np.median, "mean": np.mean}[reduce](t, axis=1)
    return {"min": np.nanmin, "median": np.nanmedian, "mean": np.nanmean}[reduce](t, axis=1)


def _nan_trim_mean(t: np.ndarray, cut: float) -> np.ndarray:
    """Row-wise trimmed mean ignoring NaN: ``floor(cut * k)`` values cut from each end of a row's k values.

    Equal to ``scipy.stats.trim_mean(t, cut, axis=1)`` on rows without NaN (scipy has no NaN policy here).
    """
    s = np.sort(t, axis=1)  # NaN sort last
    k = np.isfinite(s).sum(axis=1)
    lo = np.floor(cut * k).astype(np.int64)
    j = np.arange(t.shape[1])[None, :]
    keep = (j >= lo[:, None]) & (j < (k - lo)[:, None])
    return np.where(keep, s, 0.0).sum(axis=1) / keep.sum(axis=1)


def repeat_counts(latencies: np.ndarray) -> np.ndarray:
    """Recorded (non-NaN) repeats per sample of an ``(n,)`` or ``(n, R)`` latency array."""
    t = np.asarray(latencies, dtype=np.float64)
    return np.isfinite(t).astype(np.int64) if t.ndim == 1 else np.isfinite(t).sum(axis=1)


def isj_bandwidth(data: np.ndarray, grid_points: int = 1 << 14) -> float:
    """Improved Sheather–Jones bandwidth (Botev et al. 2010) of 1-D ``data``, in the data's units.

    A plug-in selector that estimates the roughness functional by a fixed-point iteration over
    derivative orders 7..2 on the DCT of a fine histogram, with no normal-reference assumption: on
    multi-modal data it returns a bandwidth on the scale of the individual modes. The algorithm and
    constants follow the paper's reference code (also used by KDEpy). Raises ``ValueError`` when the
    fixed point has no root (e.g. fewer than two distinct values).
    """
    x = np.asarray(data, dtype=np.float64).ravel()
    lo, hi = x.min(), x.max()
    if not hi > lo:
        raise ValueError("the ISJ bandwidth needs at least two distinct values")
    span = hi - lo
    lo, hi = lo - span / 10, hi + span / 10  # Botev's padding of the range
    width = hi - lo
    counts = linear_binning(x, lo, (hi - lo) / (grid_points - 1), grid_points)
    counts /= counts.sum()
    # cosine coefficients of the binned density: a_k = 2 sum_j p_j cos(k pi x_j) is scipy's unnormalised DCT-II;
    # the roughness ||f_t^(s)||^2 = 1/2 sum_k (k pi)^(2s) a_k^2 exp(-k^2 pi^2 t) (Botev's a2 = (a/2)^2 with factor 2)
    a = fft.dct(counts, type=2)
    i_sq = np.arange(1, grid_points, dtype=np.float64) ** 2
    a2 = a[1:] ** 2
    n = len(x)

    def fixed_point(t: float) -> float:
        ell = 7
        f = 0.5 * np.pi ** (2 * ell) * np.sum(i_sq**ell * a2 * np.exp(-i_sq * np.pi**2 * t))
        for s in range(ell - 1, 1, -1):
            if not f > 0:  # the roughness underflowed: t is below the root (t - inf), without dividing by zero
                return -1.0
            k0 = np.prod(np.arange(1, 2 * s, 2, dtype=np.float64)) / np.sqrt(2 * np.pi)
            const = (1 + 0.5 ** (s + 0.5)) / 3
            time_s = (2 * const * k0 / (n * f)) ** (2 / (3 + 2 * s))
            f = 0.5 * np.pi ** (2 * s) * np.sum(i_sq**s * a2 * np.exp(-i_sq * np.pi**2 * time_s))
        if not f > 0:
            return -1.0
        return t - (2 * n * np.sqrt(np.pi) * f) ** (-2 / 5)

    n_eff = max(min(1050, n), 50)
    tol = 1e-11 + 0.01 * (n_eff - 50) / 1000
    while True:
        try:
            t_star, res = optimize.brentq(fixed_point, 0, tol, full_output=True, disp=False)
            if res.converged and t_star > 0:
                return float(np.sqrt(t_star) * width)
        except ValueError:
            pass
        tol *= 2
        if tol >= 1:
            raise ValueError("the ISJ fixed point has no root for these data")


# ------------------------------------------------------------------------------ unsupervised (KDE)
@dataclass
class KDEExitStealer:
    """Discover the exits of a deployment from per-sample latencies (see the module docstring).

    ``bandwidth``: ``"isj"`` (default), ``"silverman"``, ``"scott"`` (scipy's rules, which oversmooth
    multi-modal data), or a number in the working scale's units (latency units, or natural-log units
    with ``scale="log"``). ``trim``: quantiles outside which samples are left out of the fit (they are
    still assigned, to the nearest extreme cluster). ``grid_step``: grid step as a fraction of the
    bandwidth; ``bandwidth_scale`` multiplies the data-driven bandwidth (a value of 1.5–2 suppresses
    spurious modes in long exponential tails with tens of thousands of samples, at some cost on
    heavily overlapping exits). A density minimum separates two exits only when it passes the
    significance, depth, support and size tests of ``_boundaries`` (weak minima merge away, weakest
    first). Sparse stragglers form no cluster. ``n_exits``: when the adversary knows the exit count
    (exposed once, or from the shadow architecture), the strongest ``n_exits`` modes are kept instead
    of testing significance — far more robust when noise blurs the gaps, since a missed cluster
    would shift every exit index above it.

    Measured on synthetic timings (6 exits, 0.3 ms gaps, skewed jitter, 1 % stragglers at 5–20x): with
    10 or 3 repeats per sample (minimum taken) the exits and assignments are recovered exactly for
    150+ samples; with a single query per sample accuracy tracks the overlap of the jitter.

    Fitted attributes: ``n_exits_``, ``boundaries_`` (sorted latencies separating exit k and k+1, in
    the input's units), ``modes_`` (latency of each cluster's density peak), ``bandwidth_`` (working
    scale units), ``bandwidth_method_``, ``grid_`` and ``density_`` (for plots), ``cluster_sizes_``.

    Exit indices are cluster ranks by latency: when some exit is never taken by the queried samples,
    the clusters above it are numbered one lower than the real exits (no unsupervised method can see
    an exit nobody takes) — unless :meth:`align` matched the clusters to reference timings with known
    exits, after which ``exit_map_`` (cluster rank -> exit) numbers them. ``centers_`` holds each
    cluster's median latency.
    """

    bandwidth: str | float = "isj"
    reduce: Reduce = "trimmed"
    scale: Literal["linear", "log"] = "linear"
    trim: tuple[float, float] = (0.001, 0.995)
    bandwidth_scale: float = 1.0
    grid_step: float = 0.05
    min_depth: float = 0.25
    min_local_significance: float = 1.0
    min_significance: float = 3.0
    min_mode_support: float = 5.0
    min_cluster_fraction: float = 0.002
    min_cluster_size: int = 5
    max_exits: int = 6
    n_exits: int | None = None

    n_exits_: int = field(init=False, default=0)
    boundaries_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    modes_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    bandwidth_: float = field(init=False, default=math.nan)
    bandwidth_method_: str = field(init=False, default="")
    grid_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    density_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    cluster_sizes_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    centers_: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.empty(0))
    exit_map_: np.ndarray | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        lo, hi = self.trim
        if not 0 <= lo < hi <= 1:
            raise InputError(f"trim must be quantiles 0 <= low < high <= 1, got {self.trim}")
        if self.scale not in ("linear", "log"):
            raise InputError(f"scale must be 'linear' or 'log', got {self.scale!r}")
        if not 0 < self.grid_step <= 0.5:
            raise InputError(f"grid_step must be a fraction of the bandwidth in (0, 0.5], got {self.grid_step}")
        if self.max_exits < 1:
            raise InputError(f"max_exits must be >= 1, got {self.max_exits}")
        if self.n_exits is not None and self.n_exits < 1:
            raise InputError(f"n_exits must be >= 1 (or None to discover it), got {self.n_exits}")
        if isinstance(self.bandwidth, str) and self.bandwidth not in ("isj", "silverman", "scott"):
            raise InputError(f"bandwidth must be 'isj', 'silverman', 'scott' or a number, got {self.bandwidth!r}")
        if not isinstance(self.bandwidth, str) and not self.bandwidth > 0:
            raise InputError(f"a numeric bandwidth must be > 0, got {self.bandwidth}")

    # -------------------------------------------------------------------------------- public API
    def fit(self, latencies: np.ndarray) -> KDEExitStealer:
        """Find the clusters in ``latencies`` ((n,) or (n, repeats))."""
        z = self._forward(reduce_latencies(latencies, self.reduce))
        lo_q, hi_q = np.quantile(z, self.trim)
        core = z[(z >= lo_q) & (z <= hi_q)]
        if np.unique(core).size < 2:
            self._single(core)
            return self
        bw = self._bandwidth(core) * self.bandwidth_scale
        step = bw * self.grid_step
        lo, hi = core.min() - 4 * bw, core.max() + 4 * bw
        m = math.ceil((hi - lo) / step) + 1
        if m > _MAX_GRID:
            step = (hi - lo) / (_MAX_GRID - 1)
            m = _MAX_GRID
            logger.warning("latency range is %.0f bandwidths wide: grid step capped at %.3g bandwidths", (hi - lo) / bw,
                           step / bw)
        sigma_bins = bw / step
        density = binned_kde(core, lo, step, m, bw)
        support = density * math.sqrt(2 * math.pi) * sigma_bins  # samples within ~1 bandwidth of each point
        grid = lo + step * np.arange(m)
        cuts = self._boundaries(core, grid, density, support)
        self.bandwidth_ = bw
        self.grid_ = self._inverse(grid)
        self.density_ = density / (len(core) * step)  # a probability density in working-scale units
        self.boundaries_ = self._inverse(grid[cuts])
        seg = np.searchsorted(grid[cuts], core, side="right")
        self.cluster_sizes_ = np.bincount(seg, minlength=len(cuts) + 1)
        self.centers_ = self._inverse(np.array([np.median(core[seg == j]) if (seg == j).any() else np.nan
                                                for j in range(len(cuts) + 1)]))
        self.exit_map_ = None
        edges = np.r_[0, cuts, m]
        self.modes_ = self._inverse(grid[[a + int(np.argmax(density[a:b])) for a, b in itertools.pairwise(edges)]])
        self.n_exits_ = len(cuts) + 1
        return self

    def predict(self, latencies: np.ndarray) -> np.ndarray:
        """Exit index per sample: the cluster rank, or the aligned exit after :meth:`align`. Latencies beyond
        the fitted range go to the extreme clusters."""
        if not self.n_exits_:
            raise InputError("fit the stealer before predicting")
        t = reduce_latencies(latencies, self.reduce)
        rank = np.searchsorted(self.boundaries_, t, side="right").astype(np.int64)
        return rank if self.exit_map_ is None else self.exit_map_[rank]

    def align(self, reference_latencies: np.ndarray, reference_exits: np.ndarray, num_exits: int,
              offset: tuple[float, float] = (0.0, 1.0)) -> KDEExitStealer:
        """Number the fitted clusters by exit, using timings whose exits are known (the adversary's shadow).

        The reference centre of exit ``j`` is the median reduced latency of the reference samples that took
        it; exits the reference never took are placed by linear interpolation/extrapolation in the exit
        index (with one known exit, the clusters' own median spacing is the gap, and a single cluster goes to
        that exit). Clusters, ordered by latency, are then matched to non-decreasing exits minimising the
        summed distance of each cluster's median to its exit's centre (dynamic programming; two clusters may
        share an exit, see :func:`_monotone_match`). ``offset`` = (shift, scale) maps this deployment's
        timings onto the reference's, ``(t - shift) / scale``, before matching: a serving stack that adds a
        constant overhead (or runs slower) than the shadow otherwise shifts every cluster onto a later exit.
        Estimate it with :func:`estimate_offset` (:func:`steal` does); matching absolute times alone cannot
        tell an offset from an exit, because with evenly spaced exits a shift by one gap fits almost as well.
        """
        if not self.n_exits_:
            raise InputError("fit the stealer before aligning it")
        if num_exits < 1:
            raise InputError(f"num_exits must be >= 1, got {num_exits}")
        ref = reduce_latencies(reference_latencies, self.reduce)
        exits = np.asarray(reference_exits, dtype=np.int64)
        if exits.shape != ref.shape:
            raise InputError(f"reference_exits must hold one exit per reference sample ({len(ref)}), "
                             f"got shape {exits.shape}")
        if ((exits < 0) | (exits >= num_exits)).any():
            raise InputError(f"reference exits must lie in [0, {num_exits - 1}]")
        centres = np.array([np.median(ref[exits == j]) if (exits == j).any() else np.nan for j in range(num_exits)])
        shift, scale = offset
        mine = (self.centers_ - shift) / scale
        self.exit_map_ = _monotone_match(mine, _fill_centres(centres, mine))
        return self

    def fit_predict(self, latencies: np.ndarray) -> np.ndarray:
        return self.fit(latencies).predict(latencies)

    def describe(self) -> dict[str, Any]:
        """The fitted clustering as JSON-ready numbers (for reports)."""
        return {"n_exits": self.n_exits_, "boundaries": self.boundaries_.tolist(), "modes": self.modes_.tolist(),
                "centers": self.centers_.tolist(), "cluster_sizes": self.cluster_sizes_.tolist(),
                "bandwidth": self.bandwidth_, "bandwidth_method": self.bandwidth_method_, "scale": self.scale,
                "reduce": self.reduce, "exit_map": None if self.exit_map_ is None else self.exit_map_.tolist()}

    # ------------------------------------------------------------------------------------ internals
    def _forward(self, t: np.ndarray) -> np.ndarray:
        if self.scale == "linear":
            return t
        if (t <= 0).any():
            raise InputError("scale='log' needs positive latencies")
        return np.log(t)

    def _inverse(self, z: np.ndarray) -> np.ndarray:
        return np.exp(z) if self.scale == "log" else np.asarray(z, dtype=np.float64)

    def _single(self, core: np.ndarray) -> None:
        self.n_exits_ = 1
        self.boundaries_ = np.empty(0)
        self.modes_ = self._inverse(np.array([np.median(core)]))
        self.cluster_sizes_ = np.array([len(core)])
        self.centers_ = self.modes_.copy()
        self.exit_map_ = None
        self.bandwidth_ = 0.0
        self.bandwidth_method_ = "none (a single distinct value)"

    def _bandwidth(self, core: np.ndarray) -> float:
        if not isinstance(self.bandwidth, str):
            self.bandwidth_method_ = "given"
            return float(self.bandwidth)
        if self.bandwidth == "isj":
            try:
                bw = isj_bandwidth(core)
                self.bandwidth_method_ = "isj"
                return bw
            except ValueError as exc:
                logger.warning("ISJ bandwidth failed (%s); falling back to Silverman's rule", exc)
        kde = stats.gaussian_kde(core, bw_method="silverman" if self.bandwidth == "isj" else self.bandwidth)
        self.bandwidth_method_ = "silverman" if self.bandwidth == "isj" else str(self.bandwidth)
        return float(kde.factor * core.std(ddof=1))

    def _boundaries(self, core: np.ndarray, grid: np.ndarray, density: np.ndarray,
                    support: np.ndarray) -> np.ndarray:
        """Grid indices of the accepted density minima, sorted (hierarchical merging of weak modes).

        Every local minimum of the density starts as a candidate boundary; weak ones are removed one
        at a time, weakest first, merging their two segments, and the criteria are re-evaluated:

        1. *Wiggles* (kernel scale): with ``S`` the effective number of samples within one bandwidth
           (``support``) at the dip and at the lower of the two neighbouring modes, the dip must be
           ``(S_low - S_dip) / sqrt(S_low + S_dip) >= min_local_significance`` and
           ``(S_low - S_dip) / S_low >= min_depth``.
        2. *Excess mass* (segment scale): a segment must hold clearly more samples above the level of
           its shallower boundary than that level would put there,
           ``(mass - flat) / sqrt(mass + flat) >= min_significance``; a failing segment merges across
           its shallower boundary. Scale-free: it holds for narrow and wide clusters alike, while a
           noise bump inside one cluster (or in its tail) rises little above its surroundings. Judging
           *segments* and merging across the shallower side keeps a real boundary from being dropped
           because a noise sliver sits next to it.
        3. *Sparse stragglers*: a mode must have ``min_mode_support`` samples within about one
           bandwidth, however many stragglers a segment collects in total.
        4. *Size*: each segment holds ``max(min_cluster_size, min_cluster_fraction * n)`` samples.
        5. At most ``max_exits`` segments (the least significant go first).

        With ``n_exits`` given, steps 2–5 are replaced by merging the weakest segment (sparse ones
        first, then the lowest excess-mass significance) until ``n_exits`` remain, and step 1 stops
        there too; fewer remain only when the density has fewer minima.
        """
        cuts, _ = signal.find_peaks(-density, plateau_size=1)
        cuts = np.asarray(cuts, dtype=np.int64)
        min_size = max(self.min_cluster_size, math.ceil(self.min_cluster_fraction * len(core)))

        def local(cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            peaks = np.maximum.reduceat(support, np.r_[0, cuts])
            low, dip = np.minimum(peaks[:-1], peaks[1:]), support[cuts]
            z = (low - dip) / np.sqrt(np.maximum(low + dip, 1e-300))
            return z, np.divide(low - dip, low, out=np.zeros_like(low), where=low > 0)

        def segments(cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Per segment: excess-mass significance over its shallower boundary, size, that boundary's index."""
            sizes = np.bincount(np.searchsorted(grid[cuts], core, side="right"), minlength=len(cuts) + 1)
            dip = density[cuts]
            left, right = np.r_[-np.inf, dip], np.r_[dip, -np.inf]  # boundary levels (-inf: no boundary)
            shallower = np.where(left >= right, np.arange(len(cuts) + 1) - 1, np.arange(len(cuts) + 1))
            level = np.maximum(left, right)
            edges = np.r_[0, cuts, len(grid)]
            z = np.empty(len(cuts) + 1)
            for j in range(len(cuts) + 1):
                r = density[edges[j] : edges[j + 1]]
                above = r > level[j]
                mass, flat = r[above].sum(), level[j] * above.sum()  # in samples (density is per grid bin)
                z[j] = (mass - flat) / math.sqrt(max(mass + flat, 1e-300))
            return z, sizes, shallower

        known = self.n_exits
        # 1. wiggles: minima that are shallow or insignificant at the kernel's own scale
        while len(cuts) and (known is None or len(cuts) + 1 > known):
            z, depth = local(cuts)
            bad = (z < self.min_local_significance) | (depth < self.min_depth)
            if not bad.any():
                break
            cuts = np.delete(cuts, np.flatnonzero(bad)[np.argmin(z[bad])])
        # 2. modes holding no more samples than the density at their shallower boundary would spread over
        #    them merge across that boundary, weakest first; then too-small modes; then too many modes
        while len(cuts):
            z, sizes, shallower = segments(cuts)
            peak_support = np.maximum.reduceat(support, np.r_[0, cuts])
            if known is not None:  # the count is given: merge the weakest mode until it is reached
                if len(cuts) + 1 <= known:
                    break
                sparse = peak_support < self.min_mode_support
                j = int(np.argmin(np.where(sparse, -np.inf, z)))
            elif (z < self.min_significance).any():
                j = int(np.argmin(z))
            elif (peak_support < self.min_mode_support).any():  # sparse stragglers, however many
                j = int(np.argmin(peak_support))
            elif (sizes < min_size).any():
                j = int(np.argmin(sizes))
            elif len(cuts) + 1 > self.max_exits:
                j = int(np.argmin(z))
            else:
                break
            cuts = np.delete(cuts, shallower[j])
        return cuts


def _fill_centres(centres: np.ndarray, cluster_centres: np.ndarray) -> np.ndarray:
    """Per-exit reference centres with the gaps (NaN) filled linearly in the exit index.

    Inside the known range by interpolation; beyond it by the mean gap per exit of the known range (or,
    with a single known exit, the fitted clusters' median spacing; with a single cluster too, unknown exits
    are put out of reach).
    """
    known = np.flatnonzero(~np.isnan(centres))
    if not len(known):
        raise InputError("no reference sample to align the clusters with")
    idx = np.arange(len(centres), dtype=np.float64)
    first, last = known[0], known[-1]
    if len(known) >= 2:
        gap = (centres[last] - centres[first]) / (last - first)
    else:
        gap = float(np.median(np.diff(cluster_centres))) if len(cluster_centres) > 1 else np.inf
    filled = np.interp(idx, known, centres[known])
    with np.errstate(invalid="ignore"):  # inf * 0 never happens: the known exits are excluded below
        filled[idx < first] = centres[first] - gap * (first - idx[idx < first])
        filled[idx > last] = centres[last] + gap * (idx[idx > last] - last)
    return filled


def _monotone_match(cluster_centres: np.ndarray, exit_centres: np.ndarray) -> np.ndarray:
    """Non-decreasing exits for the sorted clusters, minimising the summed |cluster - exit| distance.

    Non-decreasing rather than strictly increasing: a cluster split in two (the KDE told to find more
    clusters than the target's samples really form, e.g. because one of the shadow's exits is unused by
    the target) then maps both halves to the same exit instead of pushing every later cluster one exit up
    (CIFAR-10 ResNet-56 x6: 0.958 strict vs 0.993 non-decreasing; equal on the Location recordings).
    """
    k, e = len(cluster_centres), len(exit_centres)
    dist = np.abs(cluster_centres[:, None] - exit_centres[None, :])
    cost = dist[0].copy()
    back = np.zeros((k, e), dtype=np.int64)
    for i in range(1, k):
        best_at = np.array([int(np.argmin(cost[: j + 1])) for j in range(e)])  # previous cluster at exit <= j
        back[i] = best_at
        cost = dist[i] + cost[best_at]
    out = np.empty(k, dtype=np.int64)
    out[-1] = int(np.argmin(cost))
    for i in range(k - 1, 0, -1):
        out[i - 1] = back[i, out[i]]
    return out


def paper_kde_steal(latencies: np.ndarray, num_exits: int, bandwidth: float = 0.15, grid: int = 50,
                    reduce: Reduce = "min") -> np.ndarray:
    """The reference code's exit stealing, for comparison (fragile; see the module docstring).

    ``latencies`` in milliseconds, as the constants assume. ``sklearn.neighbors.KernelDensity``
    (Gaussian, fixed ``bandwidth``) on the per-sample minima, log-density on
    ``np.linspace(0, max + 0.5, grid)``, local minima by ``scipy.signal.argrelextrema``, the first
    ``num_exits - 1`` kept as boundaries; exit = number of boundaries at or below the latency. Where
    the reference left samples without any minimum at ``-true_exit`` (it needed the ground truth),
    this returns exit 0 for all of them.
    """
    from sklearn.neighbors import KernelDensity

    t = reduce_latencies(latencies, reduce)
    kde = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(t[:, None])
    s = np.linspace(0, t.max() + 0.5, grid)
    e = kde.score_samples(s[:, None])
    minima = s[signal.argrelextrema(e, np.less)[0]][: max(num_exits - 1, 0)]
    return np.searchsorted(minima, t, side="right").astype(np.int64)


# ---------------------------------------------------------------------------------- supervised
def latency_features(latencies: np.ndarray, reduce: Reduce = "trimmed") -> np.ndarray:
    """Per-sample features of all repeats: the 25/50/75 % quantiles and the mean (``reduce="min"``: the
    minimum and the 10/25 % quantiles, the low end, for one-sided noise).

    Which end carries the exit depends on the noise: on a quiet machine it is two-sided (the same
    computation sometimes runs faster than usual, so the minimum wanders by a gap's width) and the centre
    wins; on a loaded one it is one-sided (a query only ever waits) and the low end wins. Adversary 2
    chooses by cross-validation (:func:`choose_stealer`); measurements in ``docs/results.md``. With one
    measurement per sample (R = 1) every feature equals the value; NaN repeats are ignored.
    """
    t = np.asarray(latencies, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or not t.size:
        raise InputError(f"latencies must be a non-empty (n,) or (n, repeats) array, got shape {t.shape}")
    finite = np.isfinite(t)
    if np.isinf(t).any() or not finite.any(axis=1).all():
        raise InputError("latencies must be finite, with at least one recorded repeat per sample (NaN = not made)")
    if reduce == "min":  # a loaded machine's noise only adds time: the fastest repeats carry the exit
        return np.nanquantile(t, [0.0, 0.1, 0.25], axis=1).T
    if finite.all():
        q = np.quantile(t, [0.25, 0.5, 0.75], axis=1).T
        return np.hstack([q, t.mean(axis=1, keepdims=True)])
    q = np.nanquantile(t, [0.25, 0.5, 0.75], axis=1).T  # adaptive querying: a different count per sample
    return np.hstack([q, np.nanmean(t, axis=1, keepdims=True)])


class SupervisedExitStealer:
    """Learn latency → exit on shadow timings with known exits; predict the target's exits.

    ``model="logistic"`` (default): multinomial logistic regression on standardised features — its
    boundaries are smooth thresholds between adjacent exits, so a small drift between the shadow's and
    the target's timings moves few samples across. ``"gbt"``: ``HistGradientBoostingClassifier``, for
    non-linear boundaries; it cuts at the shadow's exact values and transfers worse under drift.
    ``class_weight="balanced"`` (default) weights each exit inversely to its share of the shadow
    samples: without it the logistic stealer never predicted exits taken by a few percent of the samples
    (issue 16: per-exit recall 1, 0, 0, 1, 0, 1), although those are the ones a hybrid attack needs.
    The shadow and target timings should have the same number of repeats (quantiles of 10 repeats differ
    from those of 3); a mismatch is logged. ``offset`` = (shift, scale) maps target timings onto the
    shadow's, ``(t - shift) / scale`` (see :func:`estimate_offset`); set it after fitting.
    """

    def __init__(self, model: Literal["gbt", "logistic"] = "logistic", *, seed: int = 0,
                 class_weight: Literal["balanced"] | None = "balanced", reduce: Reduce = "trimmed") -> None:
        if model not in ("gbt", "logistic"):
            raise InputError(f"model must be 'gbt' or 'logistic', got {model!r}")
        if class_weight not in ("balanced", None):
            raise InputError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
        self.model = model
        self.seed = seed
        self.class_weight = class_weight
        self.reduce: Reduce = reduce
        self.offset: tuple[float, float] = (0.0, 1.0)
        self.classes_: np.ndarray = np.empty(0, dtype=np.int64)
        self.n_repeats_ = 0
        self._clf: Any = None

    def _make(self) -> Any:
        if self.model == "gbt":
            from sklearn.ensemble import HistGradientBoostingClassifier

            return HistGradientBoostingClassifier(random_state=self.seed, class_weight=self.class_weight)
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight=self.class_weight))

    def fit(self, shadow_latencies: np.ndarray, shadow_exits: np.ndarray) -> SupervisedExitStealer:
        x = latency_features(shadow_latencies, self.reduce)
        y = np.asarray(shadow_exits, dtype=np.int64)
        if y.shape != (len(x),):
            raise InputError(f"shadow_exits must have one exit per sample ({len(x)}), got shape {y.shape}")
        self.classes_ = np.unique(y)
        self.n_repeats_ = int(np.median(repeat_counts(shadow_latencies))) if np.ndim(shadow_latencies) == 2 else 1
        self.offset = (0.0, 1.0)
        if len(self.classes_) == 1:  # nothing to learn: every shadow sample took the same exit
            self._clf = None
            return self
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):  # 4 features: BLAS threads only contend (10x slower on a loaded machine)
            self._clf = self._make().fit(x, y)
        return self

    def _features(self, target_latencies: np.ndarray) -> np.ndarray:
        if not len(self.classes_):
            raise InputError("fit the stealer on shadow timings before predicting")
        shift, scale = self.offset  # quantiles and the mean move with an affine map of the timings
        return (latency_features(target_latencies, self.reduce) - shift) / scale

    def predict(self, target_latencies: np.ndarray) -> np.ndarray:
        repeats = int(np.median(repeat_counts(target_latencies))) if np.ndim(target_latencies) == 2 else 1
        if repeats != self.n_repeats_:
            logger.warning("target timings have %d repeats per sample, the shadow timings %d: features such as the "
                           "quartiles shift with the repeat count", repeats, self.n_repeats_)
        x = self._features(target_latencies)
        if self._clf is None:
            return np.full(len(x), self.classes_[0], dtype=np.int64)
        return np.asarray(self._clf.predict(x), dtype=np.int64)

    def predict_proba(self, target_latencies: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        x = self._features(target_latencies)
        if self._clf is None:
            return np.ones((len(x), 1))
        return np.asarray(self._clf.predict_proba(x))


# ------------------------------------------------------------------------------- query planning
def ztest_queries(gap_s: float, sigma_s: float, confidence: float = 0.95) -> int:
    """Queries per sample needed to tell two adjacent exits apart (paper Eq. 1).

    Eq. 1: averaging N noisy times per exit, ``Z = (t1 - t2) / (σ √(2/N))``; the two means differ
    significantly (two-sided, level ``1 - confidence``) when ``|Z| >= z`` with
    ``z = Φ⁻¹(1 - (1 - confidence) / 2)`` (1.96 at 95 %). Hence ``N >= 2 (z σ / |t1 - t2|)²``, rounded up
    (at least 1). ``gap_s`` and ``sigma_s`` in the same unit (any).
    """
    if not gap_s > 0 or not math.isfinite(gap_s):
        raise InputError(f"the latency gap must be a positive number, got {gap_s}")
    if not sigma_s >= 0 or not math.isfinite(sigma_s):
        raise InputError(f"the noise standard deviation must be >= 0, got {sigma_s}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    n = 2.0 * (z * sigma_s / gap_s) ** 2
    return max(1, math.ceil(n - 1e-9))  # a hair of slack so exact integers (up to rounding) are not bumped


def plan_queries(per_exit_latencies: Sequence[float], noise_sigma: float, confidence: float = 0.95) -> int:
    """:func:`ztest_queries` for the smallest gap between adjacent exits' clean latencies."""
    t = np.sort(np.asarray(per_exit_latencies, dtype=np.float64))
    if t.ndim != 1 or len(t) < 2:
        raise InputError("need the clean latencies of at least two exits")
    return ztest_queries(float(np.diff(t).min()), noise_sigma, confidence)


def simulate_noisy_channel(latencies_s: np.ndarray, mu: float, sigma: float, queries: int,
                           rng: np.random.Generator | int | None = None) -> np.ndarray:
    """The paper's noisy channel (§4.2): each of ``queries`` queries adds ``|N(mu, sigma²)|``; return the mean.

    ``latencies_s`` (any shape) are the clean times; the result has the same shape:
    ``t + mean_q |z_q|``, independently per element. Averaging shrinks the noise variance as ``1/queries``.
    """
    if queries < 1:
        raise InputError(f"queries must be >= 1, got {queries}")
    if not sigma >= 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    t = np.asarray(latencies_s, dtype=np.float64)
    noise = np.abs(gen.normal(mu, sigma, size=(*t.shape, queries))).mean(axis=-1)
    return t + noise


# ------------------------------------------------------------ adversary 2: offset, timing model, choice
#: What :func:`steal` computes, versioned (cached audit stages made by another version are redone).
#: 4: stealer chosen by cross-validation on the shadow, offset-robust alignment, balanced supervised stealer,
#: the likelihood stealer, NaN-padded (adaptive) repeats.
STEALING_VERSION = 4
#: Stealers adversary 2 chooses among, in order of preference on a tie.
CANDIDATES = ("likelihood", "supervised", "nearest", "kde", "kde-blind")
#: Reductions of a sample's repeats tried for each stealer (the likelihood model uses every query instead).
REDUCTIONS: tuple[Reduce, ...] = ("trimmed", "min")
Offset = Literal["shift", "affine", "none"]


def clip_exits(exits: np.ndarray, num_exits: int) -> np.ndarray:
    """Stolen exits as valid indices (an unsupervised stealer may find more clusters than exits)."""
    return np.clip(np.asarray(exits, dtype=np.int64), 0, num_exits - 1)


_OFFSET_QUANTILES = np.linspace(0.02, 0.98, 97)


def estimate_offset(target_latencies: np.ndarray, reference_latencies: np.ndarray,
                    reference_exits: np.ndarray | None = None, *, affine: bool = False,
                    reduce: Reduce = "trimmed") -> tuple[float, float]:
    """(shift, scale) such that ``(target - shift) / scale`` is timed like the reference (the shadow).

    Two deployments of the same architecture differ by their serving stack: a constant overhead (a proxy,
    a slower front end) and possibly a speed factor. Coarse step: the 1-Wasserstein distance between the
    per-sample latency distributions, ``∫ |Q_t(u) - shift - scale·Q_r(u)| du``, is minimised by the median of
    the quantile differences (shift only) or a least-absolute-deviation line through the quantile pairs
    (``affine``); it is robust to stragglers and, unlike matching absolute times, cannot confuse an offset
    with an exit (a shift by one gap moves *all* the mass). Its error is the difference between the two
    deployments' exit shares. Fine step, with ``reference_exits``: the target's own KDE clusters are snapped
    onto the reference's per-exit centres within half the smallest gap of the coarse shift.
    """
    r = reduce_latencies(reference_latencies, reduce)
    centres = None
    if reference_exits is not None:
        exits = np.asarray(reference_exits, dtype=np.int64)
        centres = np.array([np.median(r[exits == j]) for j in np.unique(exits)])
    return _offset(target_latencies, np.quantile(r, _OFFSET_QUANTILES), centres, affine=affine, reduce=reduce)


def _offset(target_latencies: np.ndarray, reference_quantiles: np.ndarray, centres: np.ndarray | None, *,
            affine: bool, reduce: Reduce = "trimmed") -> tuple[float, float]:
    """:func:`estimate_offset` from the reference's quantiles (at ``_OFFSET_QUANTILES``) and per-exit centres."""
    t = reduce_latencies(target_latencies, reduce)
    qt, qr = np.quantile(t, _OFFSET_QUANTILES), np.asarray(reference_quantiles, dtype=np.float64)
    shift, scale = float(np.median(qt - qr)), 1.0
    if affine and np.ptp(qr) > 0:
        from sklearn.linear_model import QuantileRegressor

        reg = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(qr[:, None], qt)
        if reg.coef_[0] > 0:
            shift, scale = float(reg.intercept_), float(reg.coef_[0])
    if centres is None or len(centres) < 2 or not np.all(np.diff(centres) > 0):
        return shift, scale
    gap = float(np.diff(centres).min())
    kde = KDEExitStealer(n_exits=len(centres), max_exits=len(centres), reduce=reduce).fit(target_latencies)
    c, w = kde.centers_, kde.cluster_sizes_.astype(np.float64)
    ok = np.isfinite(c)
    if not ok.any():
        return shift, scale
    shifts = shift + scale * gap * np.linspace(-0.5, 0.5, 201)
    mapped = (c[ok][None, :] - shifts[:, None]) / scale  # (candidates, clusters)
    cost = (w[ok] * np.abs(mapped[:, :, None] - centres[None, None, :]).min(axis=2)).sum(axis=1)
    return float(shifts[int(np.argmin(cost))]), scale


@dataclass
class ExitTimingModel:
    """Per-exit timing of a deployment, fitted on shadow timings with known exits (the adversary's own).

    One query's latency at exit ``k`` is ``centre_k + scale · T(df)`` (Student t: the jitter of a real
    serving stack is heavy-tailed, and a t likelihood bounds the pull of one straggler). A sample's repeats
    give a log-likelihood per exit, tempered by ``temperature`` (fitted on the shadow: repeats of one
    sample are not independent — drift, the sample's own cost — so a plain product is overconfident), and
    a posterior over exits under a uniform prior (every exit counts the same: balanced accuracy). Exits the
    shadow never took get interpolated centres. ``offset`` maps the target's timings onto the shadow's
    (:func:`estimate_offset`). This is both a stealer (``predict``) and the model of the sequential test
    that adaptive querying stops on (``posterior``).
    """

    centres: np.ndarray
    used: np.ndarray
    df: float
    scale: float
    temperature: float = 1.0
    offset: tuple[float, float] = (0.0, 1.0)
    reference: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    shares: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    noise_grid: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    noise_logpdf: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    statistic: str = "query"
    min_grids: list[np.ndarray] = field(default_factory=list, repr=False)
    min_logpdfs: list[np.ndarray] = field(default_factory=list, repr=False)
    reference_exits: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    temperatures: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def _reference_exits(self) -> np.ndarray | None:
        return self.reference_exits if len(self.reference_exits) == len(self.reference) else None

    @classmethod
    def fit(cls, latencies: np.ndarray, exits: np.ndarray, num_exits: int, *, seed: int = 0,
            noise: Literal["empirical", "t"] = "empirical", statistic: Literal["query", "min"] = "query",
            calibrate: bool = True) -> ExitTimingModel:
        """Fit on shadow timings ``(n, R)`` with known exits.

        ``statistic="min"``: instead of every query, model a sample's *fastest* of m queries: for each m up
        to the shadow's R, the density of that minimum around each exit's centre (the fastest of every
        random m-subset of the shadow's repeats, pooled over exits; m > R extrapolated from R's, see
        :meth:`_min_density`). Under the one-sided
        noise of a loaded machine the per-query model cannot tell a slow period from a deeper exit, the
        minimum can; it is still a posterior that sharpens with m, so it drives the same sequential test.

        ``noise="empirical"`` (default): the per-query noise density is the shadow's own (a Gaussian KDE of
        the residuals around each exit's centre), whatever its shape — on a loaded machine the noise is
        one-sided (a query is never faster than the clean compute, so one fast query rules out the deeper
        exits), on a quiet one nearly symmetric; ``"t"``: a fitted Student t.
        """
        if noise not in ("empirical", "t"):
            raise InputError(f"noise must be 'empirical' or 't', got {noise!r}")
        if statistic not in ("query", "min"):
            raise InputError(f"statistic must be 'query' or 'min', got {statistic!r}")
        if statistic == "min":
            model = cls._fit_min(latencies, exits, num_exits, seed=seed)
        else:
            model = cls._fit_query(latencies, exits, num_exits, seed=seed, noise=noise)
        if calibrate:
            model.temperatures = cls._cross_temperature(latencies, exits, num_exits, seed=seed, noise=noise,
                                                        statistic=statistic)
            if len(model.temperatures):
                model.temperature = float(model.temperatures[-1])
        return model

    @classmethod
    def _fit_query(cls, latencies: np.ndarray, exits: np.ndarray, num_exits: int, *, seed: int,
                   noise: str) -> ExitTimingModel:
        t = np.asarray(latencies, dtype=np.float64)
        t = t[:, None] if t.ndim == 1 else t
        y = np.asarray(exits, dtype=np.int64)
        if y.shape != (len(t),) or ((y < 0) | (y >= num_exits)).any():
            raise InputError(f"need one exit in [0, {num_exits - 1}] per shadow sample ({len(t)}), got {y.shape}")
        known = exit_medians(reduce_latencies(t), y, num_exits)
        used = np.isfinite(known)
        if used.sum() >= 2:  # deeper exits run more of the network: centres never decrease with depth
            known[used] = _non_decreasing(known[used], np.bincount(y, minlength=num_exits)[used])
        centres = _fill_centres(known, known[used]) if used.sum() < num_exits else known
        res = (t - centres[y][:, None])[np.isfinite(t)]
        rng = np.random.default_rng(seed)
        if len(res) > 20000:
            res = rng.choice(res, 20000, replace=False)
        mad = float(stats.median_abs_deviation(res, scale="normal"))
        if not mad > 0:  # constant timings (padding): no spread to model
            return cls(centres=centres, used=used, df=np.inf, scale=max(abs(float(np.median(centres))), 1.0) * 1e-9,
                       reference=t, reference_exits=y, shares=np.bincount(y, minlength=num_exits) / len(y))
        shares = np.bincount(y, minlength=num_exits) / len(y)
        if noise == "empirical":
            grid, logpdf = _noise_density(res, mad)
            return cls(centres=centres, used=used, df=math.nan, scale=mad, reference=t, shares=shares,
                       noise_grid=grid, noise_logpdf=logpdf, reference_exits=y)
        df, loc, sc = stats.t.fit(res, loc=float(np.median(res)), scale=mad)
        if df < 1:  # heavier than Cauchy: the fit degenerates (a loaded machine's stragglers); cap the tail there
            df, loc, sc = stats.t.fit(res, f0=1.0, loc=float(np.median(res)), scale=mad)
        return cls(centres=centres + loc, used=used, df=float(min(df, 1e6)), scale=float(sc),
                   reference=t, shares=shares, reference_exits=y)

    @classmethod
    def _fit_min(cls, latencies: np.ndarray, exits: np.ndarray, num_exits: int, *, seed: int) -> ExitTimingModel:
        t = np.asarray(latencies, dtype=np.float64)
        t = t[:, None] if t.ndim == 1 else t
        y = np.asarray(exits, dtype=np.int64)
        if y.shape != (len(t),) or ((y < 0) | (y >= num_exits)).any():
            raise InputError(f"need one exit in [0, {num_exits - 1}] per shadow sample ({len(t)}), got {y.shape}")
        base = cls._fit_query(t, y, num_exits, seed=seed, noise="empirical")  # reference, shares, informativeness
        known = exit_medians(reduce_latencies(t, "min"), y, num_exits)
        used = np.isfinite(known)
        if used.sum() >= 2:
            known[used] = _non_decreasing(known[used], np.bincount(y, minlength=num_exits)[used])
        centres = _fill_centres(known, known[used]) if used.sum() < num_exits else known
        rng = np.random.default_rng(seed)
        grids, logpdfs = [], []
        reps = t.shape[1]
        for m in range(1, reps + 1):
            draws = []
            for _ in range(max(1, min(8, math.comb(reps, m)))):
                keys = rng.random(t.shape)
                keys[~np.isfinite(t)] = np.inf
                cols = np.argsort(keys, axis=1)[:, :m]
                draws.append(np.nanmin(np.take_along_axis(t, cols, axis=1), axis=1) - centres[y])
            res = np.concatenate(draws)
            res = res[np.isfinite(res)]
            sigma = float(stats.median_abs_deviation(res, scale="normal")) or base.scale
            grid, logpdf = _noise_density(res, sigma)
            grids.append(grid)
            logpdfs.append(logpdf)
        return replace(base, centres=centres, used=used, statistic="min", min_grids=grids, min_logpdfs=logpdfs,
                       temperature=1.0)

    def estimate_offset(self, target_latencies: np.ndarray, *, affine: bool = False,
                        reduce: Reduce = "trimmed") -> tuple[float, float]:
        """(shift, scale) mapping ``target_latencies`` onto the shadow timings this model was fitted on.

        Coarse: the Wasserstein estimate of :func:`estimate_offset`, with the shadow reduced over as many
        repeats as the target has (so both per-sample distributions are equally blurred by jitter). Fine:
        the shift within half the smallest gap that maximises the target's likelihood under the model's
        mixture of exits (weighted by the shadow's exit shares) — it uses the per-query noise model, so it
        stays sound with two noisy queries per sample, where clustering the target would not.
        """
        if not len(self.reference):
            raise InputError("this timing model holds no reference timings; fit it with ExitTimingModel.fit")
        t = np.asarray(target_latencies, dtype=np.float64)
        t = t[:, None] if t.ndim == 1 else t
        m = max(1, int(np.median(repeat_counts(t))))
        ref = self.reference[:, :m]
        ref = ref[np.isfinite(ref).any(axis=1)]
        shift, scale = _offset(t, np.quantile(reduce_latencies(ref, reduce), _OFFSET_QUANTILES), None, affine=affine,
                               reduce=reduce)
        c = np.sort(self.centres[self.used])
        if len(c) < 2 or not self.informative():
            return shift, scale
        gap = float(np.diff(c).min())
        shifts = shift + scale * gap * np.linspace(-0.5, 0.5, 101)
        log_pi = np.log(np.maximum(self.shares, 1e-3)) if len(self.shares) == self.num_exits else np.zeros(
            self.num_exits)
        rows = t[np.random.default_rng(0).permutation(len(t))[:2000]]
        best, best_ll = shift, -np.inf
        for d in shifts:
            ll = replace(self, offset=(float(d), scale), temperature=1.0).log_likelihood(rows) + log_pi
            total = float(np.sum(special.logsumexp(ll, axis=1)))
            if total > best_ll:
                best, best_ll = float(d), total
        return best, scale

    def recentred(self, centres: np.ndarray, weights: np.ndarray | None = None, *, clock: bool = True
                  ) -> ExitTimingModel:
        """A copy with exit centres measured on another clock blended in, e.g. today's, by the paced shadow
        queries (:mod:`mexit.attacks.pacing`): ``centres`` (NaN: unknown) from ``weights`` queries each.

        The two clocks differ by a constant: the precision-weighted mean difference over the exits both
        measured. Every centre and the reference timings move by it (so the offset estimate stays on the new
        clock), then each exit's centre is the query-weighted mean of the new measurement and the moved old one
        (the recording's rare exits have few queries, the paced answers more). Centres stay non-decreasing
        with depth (isotonic). A model of the fastest query (``statistic="min"``) has centres of another
        statistic: it only moves by the clocks' difference, measured against its reference's medians.

        ``clock=False`` keeps the model on its own clock and takes only the gaps between the new centres (they
        are moved back by the clocks' difference before the blend): for timings that do not share the new
        clock, e.g. a target that does not move with the pacer's host, whose offset is estimated against this
        model's clock while the pacer's level keeps changing with its host.
        """
        new = np.asarray(centres, dtype=np.float64)
        if new.shape != self.centres.shape:
            raise InputError(f"need {self.num_exits} centres, got {new.shape}")
        w_new = np.ones(self.num_exits) if weights is None else np.asarray(weights, dtype=np.float64)
        base = self._query_centres() if self.statistic == "min" else self.centres
        y = self._reference_exits()
        w_old = np.ones(self.num_exits) if y is None else np.array(
            [np.isfinite(self.reference[y == k]).sum() for k in range(self.num_exits)], dtype=np.float64)
        both = np.isfinite(new) & np.isfinite(base) & (w_new > 0) & (w_old > 0)
        if not both.any():
            return replace(self)
        h = w_new[both] * w_old[both] / (w_new[both] + w_old[both])
        shift = float(np.sum(h * (new[both] - base[both])) / np.sum(h))
        if not clock:
            new, shift = new - shift, 0.0
        if self.statistic == "min":
            return replace(self, centres=self.centres + shift, reference=self.reference + shift)
        moved = self.centres + shift
        have = np.isfinite(new) & (w_new > 0)
        w_new = np.where(have, w_new, 0.0)
        out = np.where(have, (w_new * np.nan_to_num(new) + w_old * moved) / np.maximum(w_new + w_old, 1e-12), moved)
        out = _non_decreasing(out, np.maximum(w_new + w_old, 1.0))
        return replace(self, centres=out, reference=self.reference + shift)

    def _query_centres(self) -> np.ndarray:
        """Per-exit median of the reference's per-sample trimmed means (NaN without reference or exits)."""
        y = self._reference_exits()
        if y is None:
            return np.full(self.num_exits, np.nan)
        return exit_medians(reduce_latencies(self.reference), y, self.num_exits)

    @property
    def num_exits(self) -> int:
        return len(self.centres)

    def informative(self, alpha: float = 0.01) -> bool:
        """Whether the exits the shadow used have distinguishable timings (False: e.g. constant-time padding).

        A Kruskal–Wallis test of the shadow's per-sample latencies (trimmed mean and fastest repeat) across
        its exits: timing reveals the exit if either differs between exits at level ``alpha``. A model built
        by hand, without shadow timings, is informative when its exit centres differ.
        """
        if len(self.reference) and len(self.shares) == self.num_exits and self.used.sum() >= 2:
            y = self._reference_exits()
            if y is not None:
                for reduce in ("trimmed", "min"):
                    r = reduce_latencies(self.reference, reduce)  # type: ignore[arg-type]
                    groups = [r[y == k] for k in np.unique(y)]
                    if np.ptp(r) > 0 and stats.kruskal(*groups).pvalue < alpha:
                        return True
                return False
        c = np.sort(self.centres[self.used])
        return len(c) >= 2 and float(np.diff(c).min()) > 0

    def log_likelihood(self, latencies: np.ndarray) -> np.ndarray:
        """(n, num_exits) tempered log-likelihood of each sample's recorded repeats (NaN repeats ignored)."""
        t = np.asarray(latencies, dtype=np.float64)
        t = t[:, None] if t.ndim == 1 else t
        shift, sc = self.offset
        if self.statistic == "min":
            counts = repeat_counts(t)
            stat = (reduce_latencies(t, "min") - shift) / sc
            out = np.empty((len(t), self.num_exits))
            for m in np.unique(counts):
                rows = counts == m
                grid, logpdf = self._min_density(int(m))
                z = stat[rows, None] - self.centres[None, :]
                out[rows] = np.interp(z, grid, logpdf, left=logpdf.min(), right=logpdf.min())
            return out / self._temper(t)
        z = ((t - shift) / sc)[:, :, None] - self.centres[None, None, :]
        if len(self.noise_grid):
            floor = float(self.noise_logpdf.min())
            lp = np.interp(z, self.noise_grid, self.noise_logpdf, left=floor, right=floor)
        elif np.isfinite(self.df):
            lp = stats.t.logpdf(z / self.scale, self.df)
        else:
            lp = stats.norm.logpdf(z / self.scale)
        return np.where(np.isfinite(z), lp, 0.0).sum(axis=1) / self._temper(t)

    def _min_density(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Grid and log-density of the fastest of ``m`` queries around an exit's centre.

        Up to the shadow's R repeats: measured (the fastest of random m-subsets of its repeats). Beyond R,
        extrapolated: the fastest of m queries is the fastest of m/R groups of R, so its survival function is
        the measured one for R raised to the power m/R (groups taken as independent; within a group the
        measured density keeps whatever correlation the repeats have). Adaptive querying asks uncertain
        samples up to 4× the budget, far beyond a shadow's 10 repeats; reusing R's density there read them
        shallower, the more they were asked (one jittery recording: 0.642 balanced, samples of exits 1 and 5
        read as 0 and 4; re-read with the extrapolation 0.703, with the per-query model 0.899;
        ``docs/results.md``, session 6).
        """
        r = len(self.min_grids)
        grid, logpdf = self.min_grids[min(max(m, 1), r) - 1], self.min_logpdfs[min(max(m, 1), r) - 1]
        if m <= r:
            return grid, logpdf
        pdf = np.exp(logpdf)
        step = float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
        cdf = np.clip(np.cumsum(pdf) * step / max(float(pdf.sum() * step), 1e-300), 0.0, 1.0)
        surv = np.clip(1.0 - cdf + pdf * step / 2, 1e-300, 1.0)  # at the bin's centre
        k = m / r
        out = math.log(k) + (k - 1.0) * np.log(surv) + logpdf
        return grid, np.maximum(out, float(out.max()) + math.log(1e-4))  # the same floor as _noise_density

    def _temper(self, t: np.ndarray) -> np.ndarray | float:
        """Per-row tempering: by each sample's number of repeats when calibrated per count, else the scalar."""
        if not len(self.temperatures):
            return self.temperature
        j = np.clip(repeat_counts(t), 1, len(self.temperatures)) - 1
        return self.temperatures[j][:, None]

    def posterior(self, latencies: np.ndarray) -> np.ndarray:
        """(n, num_exits) posterior over exits under a uniform prior."""
        ll = self.log_likelihood(latencies)
        ll -= ll.max(axis=1, keepdims=True)
        p = np.exp(ll)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, latencies: np.ndarray) -> np.ndarray:
        return np.argmax(self.log_likelihood(latencies), axis=1).astype(np.int64)

    def predict_proba(self, latencies: np.ndarray) -> np.ndarray:
        return self.posterior(latencies)

    @classmethod
    def _cross_temperature(cls, latencies: np.ndarray, exits: np.ndarray, num_exits: int, *, seed: int, noise: str,
                           statistic: str) -> np.ndarray:
        """Per repeat count m = 1..R, the tempering of the log-likelihood that minimises the log loss of the
        true exit on the shadow's first m repeats, cross-fitted (empty: not calibrated).

        Each half of the shadow is scored by a model fitted on the other half: repeats of one sample are not
        independent (drift, the sample's own cost), so a plain product of per-query likelihoods becomes
        overconfident as m grows, and a statistic whose density was estimated on the same samples can be off
        in either direction. The sequential test's stopping confidence means what it says only after this.
        """
        t = np.asarray(latencies, dtype=np.float64)
        t = t[:, None] if t.ndim == 1 else t
        y = np.asarray(exits, dtype=np.int64)
        if len(y) < 20 or len(np.unique(y)) < 2:
            return np.empty(0)
        perm = np.random.default_rng(seed).permutation(len(y))
        halves = (perm[: len(y) // 2], perm[len(y) // 2 :])
        models = []
        for a, _ in (halves, halves[::-1]):
            if len(np.unique(y[a])) < 2:
                return np.empty(0)
            models.append(cls.fit(t[a], y[a], num_exits, seed=seed, noise=noise,  # type: ignore[arg-type]
                                  statistic=statistic, calibrate=False))  # type: ignore[arg-type]
        yy = np.concatenate([y[halves[1]], y[halves[0]]])
        temps = []
        for m in range(1, t.shape[1] + 1):
            ll = np.vstack([models[0].log_likelihood(t[halves[1], :m]), models[1].log_likelihood(t[halves[0], :m])])

            def loss(temp: float, ll: np.ndarray = ll) -> float:
                z = ll / temp
                z = z - z.max(axis=1, keepdims=True)
                return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(yy)), yy]))

            temps.append(optimize.minimize_scalar(loss, bounds=(0.05, max(2.0, float(m))), method="bounded").x)
        return np.asarray(temps, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {"centres": self.centres.tolist(), "used": self.used.tolist(), "statistic": self.statistic,
                "noise": "empirical" if len(self.noise_grid) else "t", "df": self.df, "scale": self.scale,
                "temperature": self.temperature, "temperatures": self.temperatures.tolist(),
                "offset": list(self.offset)}


def exit_medians(per_sample: np.ndarray, exits: np.ndarray, num_exits: int) -> np.ndarray:
    """Median of ``per_sample`` over the samples of each exit, NaN for an exit no sample took."""
    return np.array([np.median(per_sample[exits == k]) if (exits == k).any() else np.nan for k in range(num_exits)])


def _non_decreasing(centres: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted isotonic fit of per-exit centres in depth order: deeper exits run more of the network."""
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression().fit_transform(np.arange(len(centres)), centres, sample_weight=weights)


def _noise_density(res: np.ndarray, sigma: float, floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Grid and log-density of the per-query residuals: a binned Gaussian KDE (robust Silverman bandwidth),
    floored at ``floor`` times its peak so that a straggler far from every exit weighs the same for all."""
    r = np.asarray(res, dtype=np.float64)
    iqr = float(np.subtract(*np.quantile(r, [0.75, 0.25])))
    bw = 0.9 * min(sigma, iqr / 1.34 if iqr > 0 else sigma) * len(r) ** -0.2
    lo, hi = np.quantile(r, [0.0005, 0.9995])
    lo, hi = lo - 4 * bw, hi + 4 * bw
    step = bw / 5
    m = min(math.ceil((hi - lo) / step) + 1, 1 << 16)
    step = (hi - lo) / (m - 1)
    dens = binned_kde(r[(r >= lo) & (r <= hi)], lo, step, m, bw)
    dens = dens / (dens.sum() * step)
    dens = np.maximum(dens, floor * dens.max())
    return lo + step * np.arange(m), np.log(dens)


def sequential_stop(model: ExitTimingModel, latencies: np.ndarray, confidence: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The sequential test of adaptive querying: (posterior (n, K), confident (n,) bool).

    A sample is decided once its exit posterior under the shadow-fitted ``model`` reaches ``confidence``;
    until then it is queried again (up to the budget). Uninformative timings (``model.informative()``
    False) never become confident.
    """
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    post = model.posterior(latencies)
    return post, post.max(axis=1) >= confidence


def replay_sequential(model: ExitTimingModel, latencies: np.ndarray, exits: np.ndarray, *,
                      confidence: float = 0.95, min_queries: int = 2) -> dict[str, Any]:
    """Run the sequential test on recorded repeats with known exits (the shadow): queries it would spend.

    Replays each sample's own repeats in recording order and stops at the first count whose posterior is
    confident (or at the recorded count): the mean number of queries, the accuracy at the stop, and how many
    samples never became confident. In-sample when ``model`` was fitted on the same timings (optimistic).
    """
    t = np.asarray(latencies, dtype=np.float64)
    t = t[:, None] if t.ndim == 1 else t
    y = np.asarray(exits, dtype=np.int64)
    counts = repeat_counts(t)
    n, reps = t.shape
    stop = counts.copy()
    decided = np.zeros(n, dtype=bool)
    pred = np.zeros(n, dtype=np.int64)
    for m in range(max(1, min_queries), reps + 1):
        post, conf = sequential_stop(model, t[:, :m], confidence)
        new = conf & ~decided & (counts >= m)
        stop[new], pred[new] = m, post[new].argmax(axis=1)
        decided |= new
    last = ~decided
    if last.any():
        pred[last] = model.predict(t[last])
    per_exit = [float(stop[y == k].mean()) if (y == k).any() else None for k in range(model.num_exits)]
    return {"mean_queries": float(stop.mean()), "per_exit_mean_queries": per_exit,
            "accuracy": float((pred == y).mean()), "balanced_accuracy": _balanced(y, pred),
            "undecided": int(last.sum()), "recorded_repeats": reps, "confidence": confidence}


def describe_jitter(latencies: np.ndarray, exits: np.ndarray, num_exits: int, *, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """The jitter of a deployment measured on shadow timings, and the queries per sample the target will need.

    Per-query noise (robust σ = 1.4826·MAD of each query around its sample's median, and the 99th
    percentile of that deviation), per-exit centres and the smallest gap, the paper's Eq. 1 plan
    (:func:`plan_queries` with the robust σ, which assumes Gaussian noise), and the sequential test replayed
    on the shadow's own repeats (:func:`replay_sequential`, with the model :func:`fit_timing_model` picks):
    the mean number of queries it stopped at.
    """
    t = np.asarray(latencies, dtype=np.float64)
    t = t[:, None] if t.ndim == 1 else t
    dev = (t - np.nanmedian(t, axis=1, keepdims=True))[np.isfinite(t)]
    sigma = float(stats.median_abs_deviation(dev, scale="normal"))
    model = fit_timing_model(t, exits, num_exits, seed=seed) if t.shape[1] > 1 else ExitTimingModel.fit(
        t, exits, num_exits, seed=seed)
    used = np.sort(model.centres[model.used])
    gaps = np.diff(used)[np.diff(used) > 0]  # exits whose centres tie (a rare exit pooled by isotonic) aside
    gap = float(gaps.min()) if len(gaps) else None
    out: dict[str, Any] = {
        "per_query_sigma": sigma, "per_query_p99_abs_deviation": float(np.quantile(np.abs(dev), 0.99)),
        "per_exit_centre": [float(c) if u else None for c, u in zip(model.centres, model.used, strict=True)],
        "min_gap": gap, "gap_over_sigma": None if not gap or not sigma else gap / sigma,
        "informative": model.informative(),
        "eq1_queries": ztest_queries(gap, sigma, confidence) if gap else None,
        "model": model.describe(),
    }
    if t.shape[1] > 1 and out["informative"]:
        out["sequential"] = replay_sequential(model, t, exits, confidence=confidence)
    return out


def _balanced(y: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy over the exits present in ``y`` (the mean per-exit recall)."""
    return float(np.mean([(pred[y == k] == k).mean() for k in np.unique(y)]))


SELECTION_PRIOR = 2.0  # pseudo-samples per exit in the selection score (see _selection_score)


def _selection_score(y: np.ndarray, pred: np.ndarray, prior: float = SELECTION_PRIOR) -> float:
    """Balanced accuracy with each exit's recall shrunk towards the stealer's overall accuracy.

    ``(hits_k + prior · acc) / (n_k + prior)`` per exit, averaged: an empirical-Bayes estimate of the recall.
    Raw balanced accuracy lets one shadow sample at a rare exit swing the choice by ``1/K``; with the shrinkage an
    exit seen once weighs like a third of a sample, an exit seen fifty times is untouched. On 30 re-analysed
    (recording × query count) cases it cut the median gap between the chosen and the best stealer on the target
    from 0.013 to 0.003 balanced (accuracy gap 0.19 → 0.12; the mean balanced gap stayed 0.035).
    """
    acc = float((pred == y).mean())
    return float(np.mean([((pred[y == k] == k).sum() + prior * acc) / ((y == k).sum() + prior)
                          for k in np.unique(y)]))


def _recall(y: np.ndarray, pred: np.ndarray, num_exits: int) -> list[float | None]:
    return [float((pred[y == k] == k).mean()) if (y == k).any() else None for k in range(num_exits)]


def _one_hot(exits: np.ndarray, num_exits: int) -> np.ndarray:
    return np.eye(num_exits)[clip_exits(exits, num_exits)]


def _proba_full(stealer: SupervisedExitStealer, lat: np.ndarray, num_exits: int) -> np.ndarray:
    """Supervised class probabilities spread over all ``num_exits`` columns."""
    out = np.zeros((len(lat), num_exits))
    out[:, stealer.classes_] = stealer.predict_proba(lat)
    return out


class NearestCentreStealer:
    """Each sample goes to the exit whose shadow centre (median reduced latency of the shadow samples that took
    it) is nearest. The simplest stealer, and with ``reduce="min"`` the strongest on a loaded machine, where
    the noise only adds time and the fastest of a sample's repeats is close to its clean compute time.
    Centres are made non-decreasing in the exit index; ``offset`` maps target timings onto the shadow's.
    """

    def __init__(self, reduce: Reduce = "trimmed") -> None:
        self.reduce: Reduce = reduce
        self.offset: tuple[float, float] = (0.0, 1.0)
        self.exits_ = np.empty(0, dtype=np.int64)
        self.centres_ = np.empty(0)

    def fit(self, shadow_latencies: np.ndarray, shadow_exits: np.ndarray) -> NearestCentreStealer:
        from sklearn.isotonic import IsotonicRegression

        r = reduce_latencies(shadow_latencies, self.reduce)
        y = np.asarray(shadow_exits, dtype=np.int64)
        self.exits_ = np.unique(y)
        centres = np.array([np.median(r[y == k]) for k in self.exits_])
        if len(centres) > 1:
            centres = IsotonicRegression().fit_transform(self.exits_, centres,
                                                         sample_weight=np.bincount(y)[self.exits_])
        self.centres_ = centres
        return self

    def predict(self, target_latencies: np.ndarray) -> np.ndarray:
        if not len(self.exits_):
            raise InputError("fit the stealer on shadow timings before predicting")
        shift, scale = self.offset
        r = (reduce_latencies(target_latencies, self.reduce) - shift) / scale
        return self.exits_[np.abs(r[:, None] - self.centres_[None, :]).argmin(axis=1)]


@dataclass
class StealerChoice:
    """Which stealer adversary 2 uses, chosen by cross-validation on its shadow's labelled timings.

    ``settings[name]``: the reduction of the repeats (``trimmed`` or ``min``) that cross-validated best for
    that stealer; ``scores[name]``: its out-of-fold balanced accuracy (mean recall over the exits the shadow
    used), accuracy, per-exit recall, and the balanced accuracy of every reduction tried; ``oof[name]`` /
    ``oof_proba[name]``: each shadow sample's exit (posterior) stolen by a stealer fitted without that
    sample's label — the *cross-fitted* stolen exits a hybrid attack should be trained on
    (:func:`cross_fit_exits`).
    """

    name: str
    folds: int
    settings: dict[str, str]
    scores: dict[str, dict[str, Any]]
    oof: dict[str, np.ndarray] = field(repr=False)
    oof_proba: dict[str, np.ndarray] = field(repr=False)
    rule: str = "cross-validation on the shadow"

    def describe(self) -> dict[str, Any]:
        return {"chosen": self.name, "chosen_reduce": self.settings[self.name], "rule": self.rule,
                "folds": self.folds, "settings": self.settings, "cv": self.scores}


def choose_stealer(shadow_latencies: np.ndarray, shadow_exits: np.ndarray, num_exits: int, *, folds: int = 5,
                   seed: int = 0, candidates: Sequence[str] = CANDIDATES,
                   reductions: Sequence[Reduce] = REDUCTIONS) -> StealerChoice:
    """Cross-validate every candidate stealer and repeat reduction on the shadow's timings; pick the best.

    Stratified folds (seeded). Supervised and nearest-centre stealers and the likelihood model are fitted on
    the other folds' labelled timings; the KDE clusters all shadow timings without labels (as it clusters
    the whole target), its clusters numbered with the other folds' labels only; the blind KDE uses no label
    at all. Each stealer is tried with each reduction of the repeats: ``trimmed`` suits two-sided noise (a
    quiet machine), ``min`` one-sided noise (a loaded one); for the likelihood model they mean modelling
    every query or a sample's fastest query (:meth:`ExitTimingModel.fit`, ``statistic``).
    Balanced accuracy, not accuracy: a stealer that only ever predicts the common exits scores the majority
    share on accuracy but is useless to a hybrid attack; each exit's recall is shrunk towards the overall
    accuracy by :data:`SELECTION_PRIOR` pseudo-samples (:func:`_selection_score`), so that an exit the shadow
    took once or twice does not decide the choice alone. Ties go to the earlier candidate in
    :data:`CANDIDATES`, then the earlier reduction.
    """
    import warnings

    from sklearn.model_selection import StratifiedKFold

    lat = np.asarray(shadow_latencies, dtype=np.float64)
    y = np.asarray(shadow_exits, dtype=np.int64)
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown or not candidates:
        raise InputError(f"unknown stealer(s) {unknown or '(none given)'}; choose from {', '.join(CANDIDATES)}")
    if not reductions or any(r not in REDUCTIONS for r in reductions):
        raise InputError(f"reductions must be among {', '.join(REDUCTIONS)}, got {list(reductions)}")
    if y.shape != (len(lat),) or ((y < 0) | (y >= num_exits)).any():
        raise InputError(f"need one shadow exit in [0, {num_exits - 1}] per shadow sample ({len(lat)})")
    folds = min(folds, len(y))
    if folds < 2:
        raise InputError(f"cross-validating a stealer needs >= 2 folds and shadow samples, got {folds}")
    used = len(np.unique(y))
    specs = [(c, r) for c in candidates for r in reductions]
    proba = {spec: np.zeros((len(y), num_exits)) for spec in specs}
    kdes = {r: KDEExitStealer(max_exits=num_exits, n_exits=used, reduce=r).fit(lat)
            for c, r in specs if c == "kde"}
    for c, r in specs:
        if c == "kde-blind":
            proba[(c, r)] = _one_hot(KDEExitStealer(max_exits=num_exits, reduce=r).fit_predict(lat), num_exits)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(lat, y))
    for train, test in splits:
        for c, r in specs:
            if c == "likelihood":
                proba[(c, r)][test] = ExitTimingModel.fit(lat[train], y[train], num_exits, seed=seed,
                                                          statistic=_statistic(r)).posterior(lat[test])
            elif c == "supervised":
                sup = SupervisedExitStealer(seed=seed, reduce=r).fit(lat[train], y[train])
                proba[(c, r)][test] = _proba_full(sup, lat[test], num_exits)
            elif c == "nearest":
                near = NearestCentreStealer(r).fit(lat[train], y[train])
                proba[(c, r)][test] = _one_hot(near.predict(lat[test]), num_exits)
            elif c == "kde":
                kdes[r].align(lat[train], y[train], num_exits)
                proba[(c, r)][test] = _one_hot(kdes[r].predict(lat[test]), num_exits)
    hard = {spec: np.argmax(p, axis=1).astype(np.int64) for spec, p in proba.items()}
    bal = {spec: _balanced(y, p) for spec, p in hard.items()}
    sel = {spec: _selection_score(y, p) for spec, p in hard.items()}
    settings = {c: max((r for cc, r in specs if cc == c), key=lambda r: (round(sel[(c, r)], 9),
                                                                        -list(REDUCTIONS).index(r)))
                for c in candidates}
    scores = {c: {"reduce": settings[c], "balanced_accuracy": bal[(c, settings[c])],
                  "selection_score": sel[(c, settings[c])],
                  "accuracy": float((hard[(c, settings[c])] == y).mean()),
                  "per_exit_recall": _recall(y, hard[(c, settings[c])], num_exits),
                  "balanced_accuracy_by_reduce": {r: bal[(cc, r)] for cc, r in specs if cc == c}}
              for c in candidates}
    best = max(candidates, key=lambda c: (round(scores[c]["selection_score"], 9), -list(CANDIDATES).index(c)))
    logger.info("stealer chosen by %d-fold CV on the shadow: %s (%s repeats, balanced accuracy %.3f)", folds, best,
                settings[best], scores[best]["balanced_accuracy"])
    return StealerChoice(name=best, folds=folds, settings=settings, scores=scores,
                         oof={c: hard[(c, settings[c])] for c in candidates},
                         oof_proba={c: proba[(c, settings[c])] for c in candidates})


def _statistic(reduce: str) -> Literal["query", "min"]:
    """The timing model's statistic for a reduction setting: every query, or the fastest one."""
    return "min" if reduce == "min" else "query"


def fit_timing_model(shadow_latencies: np.ndarray, shadow_exits: np.ndarray, num_exits: int, *, seed: int = 0,
                     folds: int = 5) -> ExitTimingModel:
    """The shadow-fitted timing model for adaptive querying, its statistic (every query or the fastest)
    chosen by cross-validation on the shadow (:func:`choose_stealer` with the likelihood stealer only).

    The fastest-query model is fitted on the shadow's R repeats and extrapolated beyond them
    (:meth:`ExitTimingModel._min_density`); adaptive querying takes uncertain samples far past R, so where the
    choice between the two is close (a jittery stack rather than a loaded machine) the per-query model is the
    safer one — not enforced yet (``docs/results.md``, session 6).
    """
    choice = choose_stealer(shadow_latencies, shadow_exits, num_exits, folds=folds, seed=seed,
                            candidates=("likelihood",))
    return ExitTimingModel.fit(shadow_latencies, shadow_exits, num_exits, seed=seed,
                               statistic=_statistic(choice.settings["likelihood"]))


def cross_fit_exits(shadow_latency_ns: np.ndarray, shadow_true_exit: np.ndarray, num_exits: int, *,
                    stealer: str = "chosen", folds: int = 5, seed: int = 0, soft: bool = False) -> np.ndarray:
    """The shadow's *stolen* exits, cross-fitted: each fold stolen by a stealer fitted on the other folds.

    What a hybrid attack of adversary 2 or 3 should be fitted on: the exits it will see on the target are
    stolen, with the stealer's errors, so training on the shadow's true exits teaches the attack to trust a
    feature that is wrong whenever stealing errs (issue 16: hybrid AUC 0.881 vs 0.944 for the plain attack).
    ``stealer``: a name from :data:`CANDIDATES`, or ``"chosen"`` (the cross-validated choice of
    :func:`choose_stealer`; the same folds decide and produce the exits). ``soft``: an (n, num_exits)
    posterior over exits instead of (n,) indices (one-hot for the KDE stealers).
    """
    candidates = CANDIDATES if stealer == "chosen" else (stealer,)
    choice = choose_stealer(shadow_latency_ns, shadow_true_exit, num_exits, folds=folds, seed=seed,
                            candidates=candidates)
    return choice.oof_proba[choice.name] if soft else choice.oof[choice.name]


@dataclass
class StealResult:
    """Everything :func:`steal_exits` computed: stolen exits and posteriors per stealer, the choice, the fits."""

    stolen: dict[str, np.ndarray]
    proba: dict[str, np.ndarray] = field(repr=False)
    fits: dict[str, KDEExitStealer] = field(repr=False)
    choice: StealerChoice
    offset: tuple[float, float]
    timing: ExitTimingModel = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """JSON: the chosen stealer, its CV scores on the shadow, the estimated offset and the timing model."""
        return {**self.choice.describe(), "offset": {"shift": self.offset[0], "scale": self.offset[1]},
                "timing_model": self.timing.describe()}


ADAPTIVE_RULE = ("adaptive recording: the timing model whose sequential test decided how often each sample was "
                 "queried (the shadow's cross-validation saw fixed repeats)")


def steal_exits(target_lat: np.ndarray, shadow_lat: np.ndarray, shadow_exits: np.ndarray, num_exits: int,
                seed: int, *, offset: Offset = "shift", folds: int = 5, adaptive: bool = False,
                centres: np.ndarray | None = None, centre_weights: np.ndarray | None = None) -> StealResult:
    """Exits stolen from ``target_lat`` by every stealer, plus ``chosen`` (adversary 2's pick).

    * ``kde-blind`` — the unsupervised KDE alone, clusters numbered by latency rank (adversary 3's).
    * ``kde`` — the KDE asked for as many clusters as exits its shadow used, clusters numbered by matching
      them to the shadow's per-exit latencies after removing the estimated offset between the deployments.
    * ``nearest`` — the nearest shadow per-exit centre (:class:`NearestCentreStealer`), offset-corrected.
    * ``supervised`` — the class-balanced logistic stealer trained on the shadow's latencies and true exits,
      applied to the offset-corrected target timings (the boosted-trees variant is left out of the choice:
      it transferred worse and costs a minute of CPU per cross-validation on a loaded machine).
    * ``likelihood`` — the shadow-fitted per-exit timing model (:class:`ExitTimingModel`), offset-corrected.
    * ``chosen`` — the stealer :func:`choose_stealer` picked by cross-validation on the shadow; with
      ``adaptive=True`` (the target was queried adaptively, :class:`mexit.attacks.collect.Adaptive`) the
      likelihood model instead: the sequential test stopped each sample when *that* model was confident, so
      the easy samples carry two or three queries and the hard ones many, a profile the shadow's fixed-repeat
      cross-validation never saw (one quiet recording: likelihood 0.997 balanced behind a jittery stack where
      the cross-validated pick, the aligned KDE, scored 0.833).

    Each stealer reduces the repeats the way that cross-validated best for it (``choice.settings``).

    ``offset``: ``"shift"`` (default) estimates a constant offset between shadow and target timings,
    ``"affine"`` also a scale, ``"none"`` trusts absolute times (:meth:`ExitTimingModel.estimate_offset`).
    ``centres``: per-exit centres measured while the target was queried (the pacer's,
    :mod:`mexit.attacks.pacing`; NaN where unknown), for the likelihood model (:meth:`ExitTimingModel.recentred`);
    pass the target's drift-corrected timings with them.
    """
    if offset not in ("shift", "affine", "none"):
        raise InputError(f"offset must be 'shift', 'affine' or 'none', got {offset!r}")
    shadow_exits = np.asarray(shadow_exits, dtype=np.int64)
    choice = choose_stealer(shadow_lat, shadow_exits, num_exits, folds=folds, seed=seed)
    if adaptive:
        choice = replace(choice, name="likelihood", rule=ADAPTIVE_RULE)
    red = choice.settings
    timing = ExitTimingModel.fit(shadow_lat, shadow_exits, num_exits, seed=seed,
                                 statistic=_statistic(red["likelihood"]))
    if centres is not None:
        timing = timing.recentred(centres, centre_weights)
    off = (0.0, 1.0) if offset == "none" else timing.estimate_offset(
        target_lat, affine=offset == "affine", reduce=red.get(choice.name, "trimmed"))  # type: ignore[arg-type]
    timing.offset = off
    proba: dict[str, np.ndarray] = {}
    blind = KDEExitStealer(max_exits=num_exits, reduce=red["kde-blind"]).fit(target_lat)  # type: ignore[arg-type]
    proba["kde-blind"] = _one_hot(blind.predict(target_lat), num_exits)
    used = len(np.unique(shadow_exits))
    aligned = KDEExitStealer(max_exits=num_exits, n_exits=used, reduce=red["kde"]).fit(  # type: ignore[arg-type]
        target_lat).align(shadow_lat, shadow_exits, num_exits, off)
    proba["kde"] = _one_hot(aligned.predict(target_lat), num_exits)
    sup = SupervisedExitStealer(seed=seed, reduce=red["supervised"]).fit(  # type: ignore[arg-type]
        shadow_lat, shadow_exits)
    sup.offset = off
    proba["supervised"] = _proba_full(sup, target_lat, num_exits)
    near = NearestCentreStealer(red["nearest"]).fit(shadow_lat, shadow_exits)  # type: ignore[arg-type]
    near.offset = off
    proba["nearest"] = _one_hot(near.predict(target_lat), num_exits)
    proba["likelihood"] = timing.posterior(target_lat)
    proba["chosen"] = proba[choice.name]
    stolen = {k: np.argmax(p, axis=1).astype(np.int64) for k, p in proba.items()}
    return StealResult(stolen=stolen, proba=proba, fits={"kde": aligned, "kde-blind": blind}, choice=choice,
                       offset=off, timing=timing)


def steal(target_lat: np.ndarray, shadow_lat: np.ndarray, shadow_exits: np.ndarray, num_exits: int, seed: int
          ) -> tuple[dict[str, np.ndarray], dict[str, KDEExitStealer]]:
    """Exits stolen from ``target_lat`` per stealer (keys ``kde``, ``kde-blind``, ``supervised``, ``nearest``,
    ``likelihood``, ``chosen``) and the two KDE fits, as ``attacks.suite.steal`` returned.

    :func:`steal_exits` with its defaults; use that for the choice, posteriors and offset.
    """
    res = steal_exits(target_lat, shadow_lat, shadow_exits, num_exits, seed)
    return res.stolen, res.fits
