"""Exit stealing from response times (paper §4.2) and the query planner of its Eq. 1.

A sample that leaves at a deeper exit runs more of the network, so its response time is longer; the
per-sample latencies of many queries form one cluster per exit, ordered by depth. Three stealers:

* :class:`KDEExitStealer` — unsupervised, what the paper's Adversary 2 does, made robust. Per-sample
  latency = a trimmed mean of the repeated queries by default (20 % cut from each end). The reference
  used the minimum, on the theory that queueing noise only ever adds time; measured on our 2-vCPU VM
  the noise is two-sided (the same computation sometimes runs 20 % *faster* than usual), so the minimum
  of 10 repeats is itself an extreme value with a wide spread. Location FCN-18-1, 6 exits, 10 repeats,
  KDE told the exit count, two recordings: in-process 0.989/0.992 (min) vs 1.000/1.000 (trimmed),
  loopback HTTP 0.784/0.542 (min), 0.970/0.917 (median), 0.973/0.939 (mean), 0.985/0.924 (trimmed)
  (``benchmarks/stealing_accuracy.py`` reports every reduction). Trimming still ignores a couple of
  stragglers per sample, so it stays robust when the noise is one-sided.
  Samples beyond the quantiles ``trim`` (default 0.1 % and 99.5 %) are left out of
  the fit and assigned to the nearest extreme cluster, so a few 10x stragglers cannot stretch the
  density grid (that collapses the reference's 50-point grid on ``[0, max + 0.5]`` to chance, see
  ``reference/early-exit-deployment.md`` §4.3); the price is that a final exit taken by under 0.5 % of
  the samples merges into the one before it (the last cluster, so no other index shifts). The bandwidth is
  data-driven: by default the improved Sheather–Jones plug-in (Botev, Grotowski & Kroese, "Kernel
  density estimation via diffusion", Ann. Statist. 2010), which — unlike Silverman's or Scott's rule,
  derived for one Gaussian and far too wide on multi-modal data — follows the width of the clusters
  rather than of the whole spread. The density is evaluated on a grid whose step is
  ``bandwidth / 20`` (FFT-free binned KDE: linear binning + ``scipy.ndimage.gaussian_filter1d``), its
  minima found with ``scipy.signal.find_peaks`` and merged away, weakest first, unless the dip is
  significant against counting noise, deep relative to the lower neighbouring mode and both sides
  hold enough samples.
  The **number of exits is discovered** (number of modes), not given; it is capped at ``max_exits``.
  Latencies are used as they are (``scale="linear"``) by default: on CPU and GPU the gaps between
  adjacent exits are roughly constant in time and the serving overhead adds a constant offset and
  jitter, which ``log`` would compress for the deep exits; ``scale="log"`` is there for deployments
  whose jitter grows in proportion to latency (on the tiny-bundle benchmark both scales scored the
  same, linear marginally better in-process).
  Limits: an exit needs roughly ten queried samples to be told from noise (an isolated group of ``m``
  samples has significance ``sqrt(m)``); exit indices are cluster ranks, so a missed or spurious
  cluster shifts every index above it, and clusters are numbered from the fastest even when the fast
  exits are unused. :meth:`KDEExitStealer.align` fixes the numbering for an adversary who owns a shadow
  deployment of the same architecture: each cluster is matched (monotonically) to the exit whose shadow
  latency is closest.
* :func:`paper_kde_steal` — the reference implementation's procedure, kept for comparison only
  (fixed bandwidth 0.15 ms, 50-point grid on ``[0, max + 0.5]``, the first ``num_exits - 1`` local
  minima). Fragile by design: one outlier, a different time unit or a sub-millisecond gap breaks it.
* :class:`SupervisedExitStealer` — a classifier trained on *shadow* timings with known exits (the
  adversary owns the shadow deployment), on robust features of all repeats (quartiles, mean). Needed
  to evaluate defences honestly: a delay that defeats clustering may still be learnable. Shadow and
  target are timed on the same host in our audits, so absolute times transfer.

Plus :func:`ztest_queries` / :func:`plan_queries` (paper Eq. 1) and :func:`simulate_noisy_channel`
(the paper's MLaaS noise model, §4.2).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import fft, ndimage, optimize, signal, stats

from mexit.errors import InputError

logger = logging.getLogger(__name__)

Reduce = Literal["trimmed", "min", "median", "mean"]
TRIM = 0.2  # share of repeats cut from each end by the "trimmed" reduction
_MAX_GRID = 1 << 21


# ------------------------------------------------------------------------------------------ helpers
def reduce_latencies(latencies: np.ndarray, reduce: Reduce = "trimmed") -> np.ndarray:
    """Per-sample latency (n,) float64 from ``(n,)`` or ``(n, R)`` repeated measurements.

    ``trimmed`` (default): the mean of the repeats after cutting 20 % from each end
    (``scipy.stats.trim_mean``) — as robust as the median to a few stragglers (2 of 10 repeats), as
    efficient as the mean on the two-sided noise of a shared machine. ``min`` discards only positive
    noise (the paper's queueing model); ``median`` and ``mean`` for comparison.
    """
    t = np.asarray(latencies, dtype=np.float64)
    if t.ndim not in (1, 2) or t.shape[0] == 0 or (t.ndim == 2 and t.shape[1] == 0):
        raise InputError(f"latencies must be a non-empty (n,) or (n, repeats) array, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise InputError("latencies contain NaN/inf values")
    if t.ndim == 1:
        return t
    if reduce == "trimmed":
        return np.asarray(stats.trim_mean(t, TRIM, axis=1), dtype=np.float64)
    if reduce == "min":
        return t.min(axis=1)
    if reduce == "median":
        return np.median(t, axis=1)
    if reduce == "mean":
        return t.mean(axis=1)
    raise InputError(f"reduce must be 'trimmed', 'min', 'median' or 'mean', got {reduce!r}")


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
    counts = _linear_binning(x, lo, (hi - lo) / (grid_points - 1), grid_points)
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
        if not f > 0:
            return -1.0
        for s in range(ell - 1, 1, -1):
            k0 = np.prod(np.arange(1, 2 * s, 2, dtype=np.float64)) / np.sqrt(2 * np.pi)
            const = (1 + 0.5 ** (s + 0.5)) / 3
            time_s = (2 * const * k0 / (n * f)) ** (2 / (3 + 2 * s))
            f = 0.5 * np.pi ** (2 * s) * np.sum(i_sq**s * a2 * np.exp(-i_sq * np.pi**2 * time_s))
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


def _linear_binning(x: np.ndarray, lo: float, step: float, m: int) -> np.ndarray:
    """Counts on the grid ``lo + step * j`` (j < m), each sample split between its two grid neighbours."""
    pos = np.clip((x - lo) / step, 0, m - 1)
    left = np.minimum(np.floor(pos).astype(np.int64), m - 2) if m > 1 else np.zeros(len(x), dtype=np.int64)
    frac = pos - left
    counts = np.bincount(left, weights=1 - frac, minlength=m)
    if m > 1:
        counts += np.bincount(left + 1, weights=frac, minlength=m)
    return counts[:m]


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
        counts = _linear_binning(core, lo, step, m)
        sigma_bins = bw / step
        density = ndimage.gaussian_filter1d(counts, sigma_bins, mode="constant", truncate=6.0)
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

    def align(self, reference_latencies: np.ndarray, reference_exits: np.ndarray, num_exits: int
              ) -> KDEExitStealer:
        """Number the fitted clusters by exit, using timings whose exits are known (the adversary's shadow).

        The reference centre of exit ``j`` is the median reduced latency of the reference samples that took
        it; exits the reference never took are placed by linear interpolation/extrapolation in the exit
        index (with one known exit, the clusters' own median spacing is the gap, and a single cluster goes to
        that exit). Clusters, ordered by latency, are then matched to non-decreasing exits minimising the
        summed distance of each cluster's median to its exit's centre (dynamic programming; two clusters may
        share an exit, see :func:`_monotone_match`). The match assumes the reference was
        timed on comparable hardware and serving stack — a shadow of the same architecture on the same
        host, as in our audits; a constant offset between the two deployments is *not* estimated,
        because with evenly spaced exits any shift by one gap fits equally well.
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
        self.exit_map_ = _monotone_match(self.centers_, _fill_centres(centres, self.centers_))
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
def latency_features(latencies: np.ndarray) -> np.ndarray:
    """Per-sample features of all repeats: the 25/50/75 % quantiles and the mean.

    The centre of each sample's repeats. The minimum and the lowest quantiles looked like the natural
    choice (queueing noise only adds time) but are extreme values: on a shared VM the same computation
    sometimes runs faster than usual, and the minimum of 10 repeats wanders by a gap's width (Location
    FCN-18-1, 6 exits: supervised accuracy 0.98 -> 1.00 in-process, 0.78 -> 0.93 over loopback HTTP
    when switching from min/low quantiles to these; ``benchmarks/stealing_accuracy.py``). With one
    measurement per sample (R = 1) all four equal the value.
    """
    t = np.asarray(latencies, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or not t.size:
        raise InputError(f"latencies must be a non-empty (n,) or (n, repeats) array, got shape {t.shape}")
    if not np.isfinite(t).all() or (t <= 0).any():
        raise InputError("latencies must be finite and positive")
    q = np.quantile(t, [0.25, 0.5, 0.75], axis=1).T
    return np.hstack([q, t.mean(axis=1, keepdims=True)])


class SupervisedExitStealer:
    """Learn latency → exit on shadow timings with known exits; predict the target's exits.

    ``model="logistic"`` (default): multinomial logistic regression on standardised features — its
    boundaries are smooth thresholds between adjacent exits, so a small drift between the shadow's and
    the target's timings (two recordings, minutes apart) moves few samples across. ``"gbt"``:
    ``HistGradientBoostingClassifier``, for non-linear boundaries; it cuts at the shadow's exact values
    and transferred worse in our measurements (in-process 0.72 vs 1.00, loopback 0.75 vs 0.93 on Location
    FCN-18-1, 6 exits). The shadow and target timings should have the same number of repeats (quantiles
    of 10 repeats differ from those of 3); a mismatch is logged.
    """

    def __init__(self, model: Literal["gbt", "logistic"] = "logistic", *, seed: int = 0) -> None:
        if model not in ("gbt", "logistic"):
            raise InputError(f"model must be 'gbt' or 'logistic', got {model!r}")
        self.model = model
        self.seed = seed
        self.classes_: np.ndarray = np.empty(0, dtype=np.int64)
        self.n_repeats_ = 0
        self._clf: Any = None

    def _make(self) -> Any:
        if self.model == "gbt":
            from sklearn.ensemble import HistGradientBoostingClassifier

            return HistGradientBoostingClassifier(random_state=self.seed)
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))

    def fit(self, shadow_latencies: np.ndarray, shadow_exits: np.ndarray) -> SupervisedExitStealer:
        x = latency_features(shadow_latencies)
        y = np.asarray(shadow_exits, dtype=np.int64)
        if y.shape != (len(x),):
            raise InputError(f"shadow_exits must have one exit per sample ({len(x)}), got shape {y.shape}")
        self.classes_ = np.unique(y)
        self.n_repeats_ = 1 if np.ndim(shadow_latencies) == 1 else int(np.shape(shadow_latencies)[1])
        if len(self.classes_) == 1:  # nothing to learn: every shadow sample took the same exit
            self._clf = None
            return self
        self._clf = self._make().fit(x, y)
        return self

    def predict(self, target_latencies: np.ndarray) -> np.ndarray:
        if not len(self.classes_):
            raise InputError("fit the stealer on shadow timings before predicting")
        repeats = 1 if np.ndim(target_latencies) == 1 else int(np.shape(target_latencies)[1])
        if repeats != self.n_repeats_:
            logger.warning("target timings have %d repeats per sample, the shadow timings %d: features such as the "
                           "minimum shift with the repeat count", repeats, self.n_repeats_)
        x = latency_features(target_latencies)
        if self._clf is None:
            return np.full(len(x), self.classes_[0], dtype=np.int64)
        return np.asarray(self._clf.predict(x), dtype=np.int64)

    def predict_proba(self, target_latencies: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        x = latency_features(target_latencies)
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
