"""Preference pairs (top-N × bottom-N per input) and their hierarchical (HPO) weights, from a table of rewards.

Input: one row per scored candidate — `sample_id` (the LR input, i.e. the group), `candidate` id and hybrid
`reward` in [0, 1]. Output: one row per (winner, loser) pair, with the weights the DPO loss multiplies in.

The design choice a reader might miss: nothing here loops over groups in Python. One lexicographic sort puts
every group's candidates in ranking order (reward descending, candidate ascending), after which a group is
a contiguous slice, its winners are the first N rows of the slice and its losers the last N, and every pair
index is an arithmetic expression of (group start, group size, winner rank, loser rank).
benchmarks/pairs_10m.py times ten million candidates on one core against a per-group loop.

Rules (see docs/pairs.md for why):
- candidates whose reward is NaN or infinite (failed scoring) are left out of their group and counted;
- a group with fewer than 2N scored candidates is skipped and counted as too small (N is never clamped,
  so the selection ratio N/M of every group that trains is the configured one);
- a group whose rewards are all equal (zero spread) is skipped and counted;
- otherwise all N×N pairs are built, including pairs whose two rewards tie (only possible when the spread
  is non-zero but the top and bottom overlap in value); their count is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Weighting = Literal["hpo", "uniform"]


@dataclass(frozen=True)
class PairStats:
    """Counts and dataset-level statistics of one `build_pairs` call (worth writing into the stage marker).

    groups:             distinct sample ids in the input
    groups_with_pairs:  groups that produced N×N pairs
    groups_zero_spread: groups skipped because every candidate has the same reward
    groups_too_small:   groups skipped because they have fewer than 2N scored candidates (checked first)
    pairs:              rows of the pairs table
    pairs_tied:         pairs whose winner and loser rewards are equal
    candidates_nonfinite: input rows left out because their reward is NaN or infinite
    mu_gap_mean:        mean over groups with pairs of μ_gap(g), the group's mean reward gap
    mu_sigma:           μ_σ, mean over groups with pairs of σ_g (population std of all the group's rewards);
                        NaN when no group has pairs
    n_top:              N, winners (and losers) per group
    """

    groups: int
    groups_with_pairs: int
    groups_zero_spread: int
    groups_too_small: int
    pairs: int
    pairs_tied: int
    candidates_nonfinite: int
    mu_gap_mean: float
    mu_sigma: float
    n_top: int

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def _as_arrow(values, name: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values))
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
    if values.null_count:
        raise ValueError(
            f"build_pairs: column {name!r} has {values.null_count} null values; every row needs one"
        )
    if pa.types.is_dictionary(values.type):
        # a dictionary may hold values no row uses; those must not count as (empty) groups
        values = values.cast(values.type.value_type)
    return values


def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        if values.null_count:
            raise ValueError(f"build_pairs: column {name!r} has {values.null_count} null values")
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def _duplicates(group: np.ndarray, cand: np.ndarray, n_groups: int) -> tuple[int, int, int]:
    """How many rows repeat an earlier (group, candidate), and the first such group and candidate."""
    n_cand = int(cand.max(initial=0)) + 1
    if n_groups * n_cand < 2**63:
        key = np.sort(group * n_cand + cand)
        g, c = np.divmod(key, n_cand)
    else:
        order = np.lexsort((cand, group))
        g, c = group[order], cand[order]
    same = (g[1:] == g[:-1]) & (c[1:] == c[:-1])
    if not same.any():
        return 0, -1, -1
    i = int(np.argmax(same))
    return int(same.sum()), int(g[i]), int(c[i])


def _ranking_order(group: np.ndarray, cand: np.ndarray, rew: np.ndarray, n_groups: int) -> np.ndarray:
    """Row order by (group ascending, reward descending, candidate ascending).

    `np.lexsort` does this with three stable passes; instead the reward is replaced by its dense rank (one
    unstable float sort, which numpy vectorises) and the three keys are packed into one unique int64, whose
    unstable sort is again fast. Falls back to `np.lexsort` when the packed key would not fit in 63 bits.
    """
    if not len(rew):
        return np.zeros(0, dtype=np.int64)
    by_reward = np.argsort(rew)
    sorted_rew = rew[by_reward]
    dense = np.empty(len(rew), dtype=np.int64)
    dense[by_reward] = np.concatenate([[0], np.cumsum(sorted_rew[1:] != sorted_rew[:-1])])
    n_values = int(dense[by_reward[-1]]) + 1
    n_cand = int(cand.max()) + 1
    if n_groups * n_values * n_cand >= 2**63:
        return np.lexsort((cand, -rew, group))
    key = (group * n_values + (n_values - 1 - dense)) * n_cand + cand
    return np.argsort(key)


def build_pairs(
    sample_id: np.ndarray | pa.Array | pa.ChunkedArray,
    candidate: np.ndarray | pa.Array | pa.ChunkedArray,
    reward: np.ndarray | pa.Array | pa.ChunkedArray,
    *,
    n_top: int,
    weighting: Weighting,
) -> tuple[pa.Table, PairStats]:
    """All top-N × bottom-N (winner, loser) pairs of every group, with HPO or uniform weights.

    sample_id: [K] group key per candidate row (strings or integers); candidate: [K] non-negative integer ids,
    unique within a group; reward: [K] floats, in [0, 1] when `weighting="hpo"` (the HPO offsets 1 − μ assume
    it). Rows may come in any order and groups may have different sizes M.

    Returns a table with columns `sample_id` (the input's type), `win`, `lose` (int64 candidate ids),
    `reward_win`, `reward_lose`, `w_intra`, `w_inter`, `weight`, `group_sigma` (float64) and `group_m`
    (int32, the group's number of scored candidates). Rows are ordered by sample_id ascending, then winner
    rank, then loser rank (best winner and best loser first), so the same input always gives the same table.

    HPO (METHOD.md): w_intra = |R_w − R_l| + (1 − μ_gap(g)), μ_gap(g) the mean gap over the group's pairs;
    w_inter = σ_g + (1 − μ_σ); weight = w_intra · w_inter. Both factors, and the weight, average to 1 over the
    table. `uniform`: every factor is 1.
    """
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(
            f"build_pairs: n_top must be a positive integer (N winners per group), got {n_top!r}"
        )
    if weighting not in ("hpo", "uniform"):
        raise ValueError(f"build_pairs: weighting must be 'hpo' or 'uniform', got {weighting!r}")
    n_top = int(n_top)

    ids = _as_arrow(sample_id, "sample_id")
    cand = _as_numpy(candidate, "candidate")
    rew = _as_numpy(reward, "reward")
    if not (len(ids) == len(cand) == len(rew)):
        raise ValueError(
            f"build_pairs: sample_id, candidate and reward have lengths {len(ids)}, {len(cand)}, {len(rew)}; "
            "they must be columns of one table"
        )
    if cand.dtype.kind not in "iu":
        raise ValueError(f"build_pairs: candidate must hold integer ids, got dtype {cand.dtype}")
    if rew.dtype.kind not in "fiu":
        raise ValueError(f"build_pairs: reward must be numeric, got dtype {rew.dtype}")
    cand = cand.astype(np.int64, copy=False)
    rew = rew.astype(np.float64, copy=False)
    if len(cand) and cand.min() < 0:
        raise ValueError("build_pairs: candidate ids must be non-negative")

    # Group index in sample_id order: dictionary-encode (hashing, O(K)), then rank the small dictionary.
    encoded = ids.dictionary_encode()
    dictionary = encoded.dictionary
    rank_of_code = np.empty(len(dictionary), dtype=np.int64)
    by_id = pc.sort_indices(dictionary).to_numpy()
    rank_of_code[by_id] = np.arange(len(dictionary))
    group = rank_of_code[encoded.indices.to_numpy()]
    sorted_ids = dictionary.take(pa.array(by_id))
    n_groups = len(dictionary)

    # A duplicated (sample_id, candidate) row means an upstream stage wrote a candidate twice (e.g. a resume
    # bug); ranking it would silently double that candidate, so refuse.
    n_dup, g0, c0 = _duplicates(group, cand, n_groups)
    if n_dup:
        raise ValueError(
            f"build_pairs: {n_dup} duplicated (sample_id, candidate) rows, e.g. sample_id="
            f"{sorted_ids[g0].as_py()!r} candidate={c0}; the score table must hold each candidate once"
        )

    finite = np.isfinite(rew)
    n_nonfinite = int(len(rew) - finite.sum())
    if n_nonfinite:
        group, cand, rew = group[finite], cand[finite], rew[finite]
    if weighting == "hpo" and len(rew) and (rew.min() < 0 or rew.max() > 1):
        raise ValueError(
            f"build_pairs: HPO weights need rewards in [0, 1], got range [{rew.min():.6g}, {rew.max():.6g}]; "
            "use the hybrid reward from dp2o.reward.compute_reward or weighting='uniform'"
        )

    order = _ranking_order(group, cand, rew, n_groups)
    group, cand, rew = group[order], cand[order], rew[order]

    m = np.bincount(group, minlength=n_groups)
    start = np.cumsum(m) - m
    present = m > 0
    end = start + m
    # After the sort the first row of a group holds its max reward and the last row its min.
    spread = np.zeros(n_groups)
    spread[present] = rew[start[present]] - rew[end[present] - 1]
    too_small = m < 2 * n_top
    zero_spread = ~too_small & (spread == 0)
    keep = ~too_small & ~zero_spread
    kept = np.flatnonzero(keep)

    # Population std over all of the group's scored candidates (two-pass for accuracy).
    mean = np.bincount(group, weights=rew, minlength=n_groups) / np.maximum(m, 1)
    sigma = np.sqrt(
        np.bincount(group, weights=(rew - mean[group]) ** 2, minlength=n_groups) / np.maximum(m, 1)
    )

    # Pair (k, i, j) joins winner rank i and loser rank m − N + j of the k-th kept group. Winner and loser
    # blocks are [K, N]; pair columns are those blocks broadcast to [K, N, N] and flattened, which is a strided
    # copy rather than a gather of K·N² random indices.
    k = kept.size
    shape = (k, n_top, n_top)
    ranks = np.arange(n_top)
    win_idx = start[kept][:, None] + ranks
    lose_idx = end[kept][:, None] - n_top + ranks

    # (np.repeat is several times faster than copying a broadcast whose innermost stride is 0)
    def by_winner(block: np.ndarray) -> np.ndarray:
        return np.repeat(block.reshape(-1), n_top)

    def by_loser(block: np.ndarray) -> np.ndarray:
        return np.broadcast_to(block[:, None, :], shape).reshape(-1)

    def by_group(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, n_top * n_top)

    rew_w, rew_l = rew[win_idx], rew[lose_idx]
    gap = rew_w[:, :, None] - rew_l[:, None, :]
    if k:
        mu_gap = gap.mean(axis=(1, 2))
        mu_sigma = float(sigma[kept].mean())
        mu_gap_mean = float(mu_gap.mean())
    else:
        mu_gap = np.zeros(0)
        mu_sigma = float("nan")
        mu_gap_mean = float("nan")

    n_pairs = gap.size
    if weighting == "hpo":
        w_intra = gap + (1.0 - mu_gap)[:, None, None]
        w_inter = sigma[kept] + (1.0 - mu_sigma)
        weight = (w_intra * w_inter[:, None, None]).reshape(-1)
        w_intra, w_inter = w_intra.reshape(-1), by_group(w_inter)
    else:
        w_intra = w_inter = weight = np.ones(n_pairs)

    table = pa.table(
        {
            "sample_id": sorted_ids.take(pa.array(by_group(kept.astype(np.int32)))),
            "win": by_winner(cand[win_idx]),
            "lose": by_loser(cand[lose_idx]),
            "reward_win": by_winner(rew_w),
            "reward_lose": by_loser(rew_l),
            "w_intra": w_intra,
            "w_inter": w_inter,
            "weight": weight,
            "group_sigma": by_group(sigma[kept]),
            "group_m": by_group(m[kept].astype(np.int32)),
        }
    )
    stats = PairStats(
        groups=n_groups,
        groups_with_pairs=int(kept.size),
        groups_zero_spread=int((zero_spread & present).sum()),
        groups_too_small=int(too_small.sum()),
        pairs=n_pairs,
        pairs_tied=int(np.count_nonzero(gap == 0)),
        candidates_nonfinite=n_nonfinite,
        mu_gap_mean=mu_gap_mean,
        mu_sigma=mu_sigma,
        n_top=n_top,
    )
    return table, stats
