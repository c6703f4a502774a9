"""Cost control for draft-model speculation: how many tokens to draft in the next step.

Drafting pays only while verifying is cheap: on an MoE target a verify step of K + 1 rows per
sequence reads the experts of all those rows, and the drafter's K steps cost time too. With
``c_i`` the measured chance that draft position i is accepted once reached, a step with K
drafts yields on average ``E(K) = 1 + sum_{j<=K} prod_{i<=j} c_i`` tokens per sequence and
costs ``verify(K) + K * draft`` seconds; K = 0 yields 1 token for ``verify(0)`` (a target
step plus the drafter's one catch-up row per sequence: the drafter runs over every token). The
engine takes the K with the most tokens per second.

Costs depend on the batch size, so they are kept per batch-size bucket (powers of two), each
as the median of its recent timings (after a first, warm-up one). A bucket learns
``verify(0)`` and ``verify(K_max)`` first; other K are interpolated linearly in K until
measured. While K = 0 wins, every ``probe_every``-th step
still drafts K_max, so that the acceptance estimates (and the costs) stay current.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or above ``batch_size``."""
    return 1 << max(batch_size - 1, 0).bit_length()


@dataclass
class _Timing:
    """Recent timings of one kind of step. The first is dropped (it pays one-time kernel builds
    for its shapes); the median of the rest ignores steps slowed by a busy machine."""

    recent: deque = field(default_factory=lambda: deque(maxlen=9))
    seen: int = 0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if self.seen > 1:
            self.recent.append(seconds)

    @property
    def value(self) -> float | None:
        return statistics.median(self.recent) if self.recent else None


@dataclass
class SpecCostModel:
    max_k: int
    probe_every: int = 16  # at K = 0, draft K_max every this many steps
    prior_acceptance: float = 0.8  # before anything was verified at a position
    _verify: dict[tuple[int, int], _Timing] = field(default_factory=dict)  # (bucket, K) -> seconds per step
    _draft: dict[int, _Timing] = field(default_factory=dict)  # bucket -> seconds per batched drafter step
    _reached: list[int] = field(default_factory=list)  # per draft position: drafts that got that far
    _accepted: list[int] = field(default_factory=list)
    _plain_steps: int = 0

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"SpecCostModel.max_k={self.max_k} must be at least 1")
        self._reached = [0] * self.max_k
        self._accepted = [0] * self.max_k

    # ---- observations (cheap: a few dict updates per step) ---------------------------------
    def observe_verify(self, k: int, batch_size: int, seconds: float) -> None:
        """A target step (with the drafter's catch-up rows) where every sequence verified ``k`` drafts."""
        self._verify.setdefault((batch_bucket(batch_size), k), _Timing()).add(seconds)

    def observe_draft(self, batch_size: int, seconds: float) -> None:
        """One batched drafter step over ``batch_size`` sequences."""
        self._draft.setdefault(batch_bucket(batch_size), _Timing()).add(seconds)

    def observe_acceptance(self, draft_len: int, accepted: int) -> None:
        """One sequence's verified draft of ``draft_len`` tokens of which the first ``accepted`` passed."""
        for j in range(min(draft_len, self.max_k)):
            if j > accepted:
                break
            self._reached[j] += 1
            self._accepted[j] += j < accepted

    # ---- the model ------------------------------------------------------------------------
    def acceptance(self, j: int) -> float:
        """Chance that draft position ``j`` (0-based) is accepted once the draft got that far."""
        if self._reached[j] == 0:
            return self.prior_acceptance
        return self._accepted[j] / self._reached[j]

    def expected_tokens(self, k: int) -> float:
        """Tokens per sequence a step with ``k`` drafts yields on average."""
        total, reach = 1.0, 1.0
        for j in range(k):
            reach *= self.acceptance(j)
            total += reach
        return total

    def step_cost(self, k: int, batch_size: int) -> float | None:
        """Seconds of a step with ``k`` drafts per sequence (drafting included); None: not known yet."""
        b = batch_bucket(batch_size)
        v = self._seconds(self._verify.get((b, k)))
        if v is None:
            lo, hi = self._seconds(self._verify.get((b, 0))), self._seconds(self._verify.get((b, self.max_k)))
            if lo is None or hi is None:
                return None
            v = lo + (hi - lo) * k / self.max_k  # linear in rows until measured
        if k == 0:
            return v
        draft = self._seconds(self._draft.get(b))
        return None if draft is None else v + k * draft

    @staticmethod
    def _seconds(timing: _Timing | None) -> float | None:
        return None if timing is None else timing.value

    def choose_k(self, batch_size: int) -> int:
        """The K with the most tokens per second for this batch size; unmeasured ends first."""
        if batch_size < 1:
            return self.max_k
        for k in (self.max_k, 0):  # learn the two ends of the line first
            if self.step_cost(k, batch_size) is None:
                return k
        best = max(range(self.max_k + 1),
                   key=lambda k: (self.expected_tokens(k) / self.step_cost(k, batch_size), -k))
        if best == 0:
            self._plain_steps += 1
            if self._plain_steps % self.probe_every == 0:
                return self.max_k
        return best
