"""Cost control for speculation: how many tokens to draft in the next step.

Drafting pays only while verifying is cheap: on an MoE target a verify step of K + 1 rows per
sequence reads the experts of all those rows, and a drafter's K steps cost time too. With
``c_i`` the measured chance that draft position i is accepted once reached, a step with K
drafts yields on average ``E(K) = 1 + sum_{j<=K} prod_{i<=j} c_i`` tokens per sequence and
costs ``verify(K) + K * draft`` seconds (n-gram lookup drafts for free); K = 0 yields 1 token
for ``verify(0)``, a plain decoding step (a draft model catches up on the rows it skipped only
when it drafts next, so a plain step costs it nothing). The engine takes the K with the most
tokens per second. Acceptance is counted per source (``model``: a drafter, ``lookup``: n-gram
lookup), the step costs are shared.

Not every sequence drafts when asked: n-gram lookup finds a recurring suffix for some of them (a
quarter of the sequences per step on the default model's text), and requests that process logits
never draft. So the batch's yield is counted per sequence asked: with ``s`` the share of asked
sequences that drafted and ``r`` the drafts' length over K (recent non-probe steps of the source),
a step yields ``1 + s * (E(K) - 1)`` tokens per sequence and runs ``x = s * r * K`` extra rows per
sequence. The verify cost is a function of those rows: a step's time (the whole step: scheduling,
lookups, the model, sampling, acceptance, outputs; the drafter's own steps are the ``K * draft``
term) is filed under ``ceil(x)``, each bin holding the median of its recent rows and seconds, and
``verify(x)`` runs piecewise-linearly through the plain step and the bins (never falling as rows
grow; past the last bin along the line from the plain step through it). Taking only the model's
time and only drafting sequences, the model predicted n-gram lookup at 32 concurrent 1.6-2.8x and
it ran 0.85-0.96x plain: with a quarter of the sequences drafting, a step yields 1.4 tokens per
sequence, and lookups, acceptance and outputs cost as much as the extra rows.

Costs depend on the batch size, so they are kept per batch-size bucket (powers of two), each
as the median of its recent timings (after a first, warm-up one). A bucket learns a verify step
with K_max drafts (n-gram lookup: the most rows it measured) and ``verify(0)`` first. While K = 0
wins, a step now and then still drafts K_max (a probe), so that the acceptance estimates, the
shares and the costs stay current and drafting comes back when it pays again: by default as rarely
as keeps a probe's expected loss within 2% of the plain decoding time between probes. A probe
drafts for a share of the batch only (``probe_share``, at least one sequence; the engine sets the
proposers' ``probe_left``), though every sequence is asked (so the shares are counted): at batch
32 four sequences' drafts keep the estimates current at an eighth of a full K_max step's extra
cost, and since a draft model runs a sequence's rows only when it drafts for it (prompt included),
the sequences not probed cost it nothing. A probe step's time is not taken as a verify cost.
While only plain steps' timings come in, a judgement (best K, probe interval) stands for
``rejudge_every`` steps: on a fast model the bookkeeping is a visible share of a step. Each source's
probes are judged by their own measured loss (a lookup's cost next to nothing). Where drafting is
:meth:`SpecCostModel.hopeless` (no K pays even with every sequence drafting and every draft accepted)
acceptance cannot change the choice: probes then run ``hopeless_probe_rarity`` times rarer, and the
engine lets the drafter go without its per-step catch-up (a dormant drafter, ``moe.engine``). A
drafter whose well-measured acceptance is far below paying (:meth:`SpecCostModel.unpromising`)
probes as rarely.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


ASKED = "asked"  # the verify bin of decoding steps that asked for drafts and ran none


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or above ``batch_size``."""
    return 1 << max(batch_size - 1, 0).bit_length()


def _median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _timing(timings: dict, key) -> "_Timing":
    """``timings[key]``, made on first use (a step adds one timing: no throwaway default each time)."""
    t = timings.get(key)
    if t is None:
        t = timings[key] = _Timing()
    return t


@dataclass
class _Timing:
    """Recent timings of one kind of step. The first is dropped (it pays one-time kernel builds
    for its shapes); the median of the rest ignores steps slowed by a busy machine. (The medians
    are taken when read: a plain step adds a timing every step, a judgement reads them now and then.)"""

    recent: deque = field(default_factory=lambda: deque(maxlen=9))
    rows: deque = field(default_factory=lambda: deque(maxlen=9))  # a verify bin's extra rows per sequence
    seen: int = 0
    _stale: bool = False
    _value: float | None = None
    _x: float = 0.0

    def add(self, seconds: float, rows: float = 0.0) -> None:
        self.seen += 1
        if self.seen > 1:
            self.recent.append(seconds)
            self.rows.append(rows)
            self._stale = True

    def _update(self) -> None:
        self._value, self._stale = _median(self.recent), False
        if self._x or any(self.rows):  # (a plain step's bin: rows are all 0)
            self._x = _median(self.rows)

    @property
    def value(self) -> float | None:
        """The median of the recent timings (None before the second)."""
        if self._stale:
            self._update()
        return self._value

    @property
    def x(self) -> float:
        """The median of ``rows``."""
        if self._stale:
            self._update()
        return self._x


@dataclass
class _Share:
    """Of recent steps in which a source was asked to draft: sequences asked, those that had a
    draft, and its tokens over what K allowed them (sums kept as steps come and go)."""

    steps: deque = field(default_factory=deque)  # (asked, drafted, tokens, allowed), the last `window`
    window: int = 32
    sums: list = field(default_factory=lambda: [0, 0, 0, 0])

    def add(self, asked: int, drafted: int, tokens: int, allowed: int) -> None:
        if not asked:
            return
        step = (asked, drafted, tokens, allowed)
        self.steps.append(step)
        for i, v in enumerate(step):
            self.sums[i] += v
        if len(self.steps) > self.window:
            for i, v in enumerate(self.steps.popleft()):
                self.sums[i] -= v

    def share(self) -> float:
        """Of the sequences asked, the share that had a draft (1 before any step)."""
        return self.sums[1] / self.sums[0] if self.sums[0] else 1.0

    def fill(self) -> float:
        """Draft tokens over the tokens K allowed the drafting sequences (1 before any draft)."""
        return self.sums[2] / self.sums[3] if self.sums[3] else 1.0


SOURCES = ("model", "lookup")  # who drafted: a drafter model (costs drafting steps) or n-gram lookup (free)


@dataclass
class SpecCostModel:
    max_k: int
    # at K = 0, draft K_max every this many steps; None: as rarely as keeps a probe's expected
    # loss under ``probe_budget`` of the plain decoding time between probes (at least every 16)
    probe_every: int | None = None
    probe_budget: float = 0.02  # shared by the sources that probe (see ``sources``)
    hopeless_probe_rarity: int = 4  # probes this many times rarer where drafting is hopeless or unpromising
    unpromising_after: int = 32  # drafts reaching the first position before a drafter can count as unpromising
    sources: int = 1  # draft sources that probe on their own: 2 for n-gram lookup first and a drafter
    probe_share: float = 0.125  # of the batch's sequences that draft in a probe (at least one)
    # drafting must beat plain decoding by this factor in prediction: step timings on a busy CPU are
    # noisy, and a marginal predicted gain was as often a loss (bench_spec: x1.09 predicted, 0.61x got)
    min_gain: float = 1.1
    prior_acceptance: float = 0.8  # before anything was verified at a position
    # while drafting wins, a plain step every this many steps keeps verify(0) current: else its
    # timings date from when K = 0 last won (often the engine's first, slow steps) and drafting is
    # weighed against a stale plain step (bench_spec at 32: plain 9.8 ms from warm-up, 6.7 ms now)
    refresh_every: int = 16
    # while nothing but plain steps' timings came in, a judgement (best K, probe interval) stands for
    # this many steps: re-deriving it and the step's full bookkeeping cost ~50 us, 15% of a batch-1
    # step of the default model (at 16: ~1% of its plain decoding time)
    rejudge_every: int = 64
    # (bucket, ceil(extra rows per sequence)) -> seconds per step and those rows
    _verify: dict[tuple[int, int], _Timing] = field(default_factory=dict)
    _draft: dict[int, _Timing] = field(default_factory=dict)  # bucket -> seconds per batched drafter step
    # (bucket, source) -> a probe step's measured loss: its seconds (drafting with the rows the drafter
    # caught up on, and the verify) less plain decoding's time for the tokens it yielded; per source,
    # since a lookup's probes cost next to nothing and a drafter's do (one bucket for both had the
    # lookup's set a drafter's probes 16 steps apart at 32 concurrent)
    _probe_loss: dict[tuple[int, str], _Timing] = field(default_factory=dict)
    # source -> per draft position: drafts that got that far, and of those the accepted ones
    _reached: dict[str, list[int]] = field(default_factory=dict)
    _accepted: dict[str, list[int]] = field(default_factory=dict)
    # source -> per draft position: drafts asked for that many tokens, and of those the ones that had
    # that position (a lookup's draft is often shorter than asked: its continuation ends)
    _asked_at: dict[str, list[int]] = field(default_factory=dict)
    _long_at: dict[str, list[int]] = field(default_factory=dict)
    _shares: dict[str, _Share] = field(default_factory=dict)  # source -> who drafts when asked, how long
    _plain_steps: dict[str, int] = field(default_factory=dict)  # source -> K = 0 choices since its last probe
    _since_plain: dict[int, int] = field(default_factory=dict)  # bucket -> decoding steps since a plain one
    probing: dict[str, bool] = field(default_factory=dict)  # source -> is the last choose_k's K a probe?
    _measured: set = field(default_factory=set)  # buckets with a verify step's timing (for good)
    _version: int = 0  # bumped by every observation but a plain step's timing
    _judged: dict = field(default_factory=dict)  # (bucket, source) -> [version, steps, best K, probe interval]
    # The check on the prediction: of the last ``realized_window`` decoding steps in which a source
    # drafted (not probes), each step's tokens per second over plain decoding's; when their mean is
    # below 1 the source keeps K = 0 (probes aside) for ``veto_steps`` of its choices, then may draft
    # again (and be checked again). The cost model's parts can each be right and their sum wrong (at 32
    # concurrent the lookup predicted x1.1-1.5 and its drafting steps lost); this bounds the loss.
    realized_window: int = 6
    veto_steps: int = 256
    _realized: dict = field(default_factory=dict)  # (bucket, source) -> deque of realized speed-ups
    _veto: dict = field(default_factory=dict)  # (bucket, source) -> [choices left with K = 0, probe interval]

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"SpecCostModel.max_k={self.max_k} must be at least 1")
        self._reached = {src: [0] * self.max_k for src in SOURCES}
        self._accepted = {src: [0] * self.max_k for src in SOURCES}
        self._asked_at = {src: [0] * self.max_k for src in SOURCES}
        self._long_at = {src: [0] * self.max_k for src in SOURCES}
        self._shares = {src: _Share() for src in SOURCES}
        self._plain_steps = dict.fromkeys(SOURCES, 0)
        self.probing = dict.fromkeys(SOURCES, False)

    # ---- observations (cheap: a few dict updates per step) ---------------------------------
    def observe_verify(self, rows: float, batch_size: int, seconds: float, asked: bool = False) -> None:
        """A decoding step (drafter steps excepted) that ran ``rows`` draft rows per sequence on
        average (0: a plain decoding step, which costs a draft model nothing: it catches up when
        it drafts next). ``asked``: sources were asked for drafts (K > 0); such a step without a
        draft row times what asking costs (lookups, bookkeeping) apart from plain decoding."""
        k, b = min(math.ceil(rows), self.max_k), batch_bucket(batch_size)
        t = _timing(self._verify, (b, k if k or not asked else ASKED))
        t.add(seconds, rows)
        self._since_plain[b] = 0 if k == 0 and not asked else self._since_plain.get(b, 0) + 1
        if k or asked:
            self._version += 1
            if k and t.value is not None:
                self._measured.add(b)

    def refresh_plain(self, batch_size: int) -> bool:
        """Should the next step be a plain one (every source K = 0), because ``refresh_every``
        decoding steps of this batch size drafted since the last plain one? (Once: the count
        restarts, so steps that cannot be timed, with prompt chunks, do not keep drafting off.)"""
        b = batch_bucket(batch_size)
        if self._since_plain.get(b, 0) < self.refresh_every:
            return False
        self._since_plain[b] = 0
        return True

    def observe_realized(self, sources: list[str], batch_size: int, seconds: float, tokens: int) -> None:
        """A whole decoding step (not a probe; drafting included) in which ``sources`` drafted,
        yielding ``tokens`` tokens over the batch: its speed against plain decoding's, for the check
        on the prediction (``realized_window``)."""
        b = batch_bucket(batch_size)
        plain = self._seconds(self._verify.get((b, 0)))
        if plain is None or seconds <= 0:
            return
        speedup = tokens * plain / (batch_size * seconds)
        for source in sources:
            window = self._realized.get((b, source))
            if window is None:
                window = self._realized[b, source] = deque(maxlen=self.realized_window)
            window.append(speedup)
            if len(window) == self.realized_window and sum(window) < len(window):
                costs = self.step_costs(batch_size, source)
                interval = self.probe_interval(batch_size, source) if costs is not None else 16
                self._veto[b, source] = [self.veto_steps, interval]
                window.clear()
                self._version += 1

    def realized(self, batch_size: int, source: str) -> float | None:
        """The mean realized speed-up of the source's recent drafting steps at this batch size."""
        window = self._realized.get((batch_bucket(batch_size), source))
        return sum(window) / len(window) if window else None

    def observe_drafting(self, source: str, asked: int, drafted: int, tokens: int, k: int) -> None:
        """A step (not a probe) in which ``source`` was asked to draft up to ``k`` tokens for
        ``asked`` decoding sequences: ``drafted`` of them drafted, ``tokens`` draft tokens in all."""
        self._shares[source].add(asked, drafted, tokens, drafted * k)
        self._version += 1

    def observe_draft(self, batch_size: int, seconds: float) -> None:
        """One batched drafter step over ``batch_size`` sequences, one row each."""
        _timing(self._draft, batch_bucket(batch_size)).add(seconds)
        self._version += 1

    def observe_probe(self, batch_size: int, seconds: float, tokens: int, sources: Sequence[str] = ("model",)) -> None:
        """A whole probe step (scheduling and drafting included) of the probing ``sources`` that
        yielded ``tokens`` tokens."""
        b = batch_bucket(batch_size)
        plain = self._seconds(self._verify.get((b, 0)))
        if plain is not None:
            for source in sources:
                _timing(self._probe_loss, (b, source)).add(seconds - tokens * plain / batch_size)
        self._version += 1

    def observe_acceptance(self, draft_len: int, accepted: int, source: str = "model",
                           asked: int | None = None) -> None:
        """One sequence's verified draft of ``draft_len`` tokens (``asked`` for: the K of its step,
        default ``draft_len``) of which the first ``accepted`` passed."""
        reached, acc = self._reached[source], self._accepted[source]
        asked_at, long_at = self._asked_at[source], self._long_at[source]
        for j in range(min(asked if asked is not None else draft_len, self.max_k)):
            asked_at[j] += 1
            long_at[j] += j < draft_len
        self._version += 1
        for j in range(min(draft_len, self.max_k)):
            if j > accepted:
                break
            reached[j] += 1
            acc[j] += j < accepted

    # ---- the model ------------------------------------------------------------------------
    def acceptance(self, j: int, source: str = "model") -> float:
        """Chance that draft position ``j`` (0-based) is accepted once the draft got that far."""
        if self._reached[source][j] == 0:
            return self.prior_acceptance
        return self._accepted[source][j] / self._reached[source][j]

    def expected_tokens(self, k: int, source: str = "model") -> float:
        """Tokens a drafting sequence gets from a step with ``k`` drafts, on average."""
        return self._expected(source)[k]

    def length_share(self, j: int, source: str = "model") -> float:
        """Chance that a draft asked for more than ``j`` tokens has position ``j`` (0-based)."""
        asked = self._asked_at[source][j]
        return self._long_at[source][j] / asked if asked else 1.0

    def _expected(self, source: str, acceptance: float | None = None) -> list[float]:
        """:meth:`expected_tokens` of K = 0 .. K_max (E(K) built up position by position: position j
        adds the chance that the draft has it times that it and every one before it pass). Counting
        every asked position as drafted had a lookup whose drafts mostly end early predicted to pay
        (Mixtral shape at batch 1: K = 3 at 1.21x, run at 1.03x). ``acceptance``: that chance at every
        position instead of the measured ones."""
        out, reach = [1.0], 1.0
        for j in range(self.max_k):
            reach *= self.acceptance(j, source) if acceptance is None else acceptance
            out.append(out[-1] + reach * self.length_share(j, source))
        return out

    def step_tokens(self, k: int, source: str = "model") -> float:
        """Tokens per sequence of the batch from a step in which ``source`` is asked for ``k``
        drafts: a drafting sequence's :meth:`expected_tokens`, for the share that drafts."""
        return self._step_tokens(source)[k]

    def _step_tokens(self, source: str, acceptance: float | None = None) -> list[float]:
        """:meth:`step_tokens` of K = 0 .. K_max (``acceptance``: as :meth:`_expected`)."""
        share = self._shares[source].share()
        return [1.0 + share * (e - 1.0) for e in self._expected(source, acceptance)]

    def draft_rows(self, k: int, source: str = "model") -> float:
        """Extra rows per sequence of the batch when ``source`` is asked for ``k`` drafts."""
        sh = self._shares[source]
        return sh.share() * sh.fill() * k

    def step_cost(self, k: int, batch_size: int, source: str = "model") -> float | None:
        """Seconds of a step with ``k`` drafts per sequence (drafting included); None: not known yet."""
        costs = self.step_costs(batch_size, source)
        return None if costs is None else costs[k]

    def step_costs(self, batch_size: int, source: str = "model") -> list[float] | None:
        """:meth:`step_cost` of K = 0 .. K_max (None while either end of the line is unmeasured)."""
        return self._cost_line(batch_size, source, self.draft_rows(1, source))

    def hopeless(self, batch_size: int, source: str = "model") -> bool:
        """Would drafting lose at this batch size even with every sequence drafting K and every draft
        accepted (for every K, a step of K + 1 tokens taking longer than K + 1 plain steps over
        ``min_gain``)? Then its acceptance cannot change the choice, only the step costs can (False
        while unmeasured)."""
        costs = self._cost_line(batch_size, source, 1.0)
        return costs is not None and self._loses_everywhere([k + 1.0 for k in range(self.max_k + 1)], costs)

    def unpromising(self, batch_size: int, source: str = "model") -> bool:
        """Would a drafter still lose at this batch size if every draft position were accepted as
        often as an optimistic bound of its measured first position (two standard errors above, after
        at least ``unpromising_after`` drafts)? Then acceptance would have to change far beyond its
        noise for drafting to pay, and a probe mostly re-measures what is known. (Not for a lookup:
        its probes cost next to nothing, and its drafting share, low at batch 1, would count against it.)"""
        n = self._reached[source][0]
        costs = self.step_costs(batch_size, source)
        if source != "model" or n < self.unpromising_after or costs is None:
            return False
        a = self._accepted[source][0] / n
        hi = min(1.0, a + 2 * math.sqrt(a * (1 - a) / n) + 2 / n)
        return self._loses_everywhere(self._step_tokens(source, hi), costs)

    def _loses_everywhere(self, tokens: list[float], costs: list[float]) -> bool:
        """Does no K > 0 yield its ``tokens[K]`` per sequence at ``min_gain`` x plain decoding's rate?"""
        return all(tokens[k] * costs[0] < self.min_gain * costs[k] for k in range(1, self.max_k + 1))

    def _cost_line(self, batch_size: int, source: str, rows: float) -> list[float] | None:
        """Seconds of a step with K = 0 .. K_max drafts asked of each sequence, ``rows`` draft rows per
        sequence per unit of K."""
        b = batch_bucket(batch_size)
        plain = self._seconds(self._verify.get((b, 0)))
        draft = 0.0 if source == "lookup" else self._seconds(self._draft.get(b))
        if plain is None or not self._verify_measured(b) or draft is None:
            return None
        # (rows, seconds) through a step that asked for drafts and ran none (plain decoding plus what
        # asking costs; plain where unmeasured) and each bin, never falling (a lower median is noise)
        asking = self._seconds(self._verify.get((b, ASKED)))
        points = [(0.0, max(plain, asking) if asking is not None else plain)]
        for k in range(1, self.max_k + 1):
            t = self._verify.get((b, k))
            if t is not None and t.value is not None and t.x > points[-1][0]:
                points.append((t.x, max(t.value, points[-1][1])))
        return [plain] + [self._verify_at(points, rows * k) + k * draft for k in range(1, self.max_k + 1)]

    @staticmethod
    def _verify_at(points: list[tuple[float, float]], x: float) -> float:
        """Seconds of a step with ``x`` extra rows per sequence: piecewise linear through ``points``,
        past the last one along the line from the plain step through it."""
        for (x0, v0), (x1, v1) in zip(points, points[1:]):
            if x <= x1:
                return v0 + (v1 - v0) * (x - x0) / (x1 - x0)
        (_, plain), (xl, vl) = points[0], points[-1]
        return plain + (vl - plain) * x / xl

    def _verify_measured(self, bucket: int) -> bool:
        """Whether any verify step (any rows: n-gram drafts come in any length, for some sequences)
        has a timing in ``bucket``."""
        return bucket in self._measured

    @staticmethod
    def _seconds(timing: _Timing | None) -> float | None:
        return None if timing is None else timing.value

    def speedup(self, k: int, batch_size: int, source: str = "model") -> float | None:
        """Predicted tokens per second with ``k`` drafts over plain decoding's; None: not known yet."""
        costs = self.step_costs(batch_size, source)
        return None if costs is None else self.step_tokens(k, source) * costs[0] / costs[k]

    def probe_interval(self, batch_size: int, source: str = "model") -> int:
        """Plain steps between probes with K_max: a fixed ``probe_every``, or as many as make a
        probe's loss (its cost over plain decoding of the tokens it yields) at most ``probe_budget``
        / ``sources`` of the plain steps' time (each source probes on its own; the budget is the
        speculation's as a whole): the loss measured on earlier probes of this batch size (which
        includes the drafter catching up on every row since it last ran), else the cost line's."""
        if self.probe_every is not None:
            return self.probe_every
        costs = self.step_costs(batch_size, source)
        loss = self._seconds(self._probe_loss.get((batch_bucket(batch_size), source)))
        if loss is None:
            loss = costs[-1] - self.step_tokens(self.max_k, source) * costs[0]
        budget = self.probe_budget / self.sources
        if self.hopeless(batch_size, source) or self.unpromising(batch_size, source):
            budget /= self.hopeless_probe_rarity  # acceptance cannot, or could only far beyond its noise, pay
        return max(16, math.ceil(loss / (budget * costs[0])))

    def choose_k(self, batch_size: int, source: str = "model") -> int:
        """The K with the most tokens per second for this batch size; unmeasured ends first; a
        probe with K_max now and then while K = 0 wins (``probing[source]`` says which)."""
        self.probing[source] = False
        if batch_size < 1:
            return self.max_k
        b = batch_bucket(batch_size)
        # learn the two ends of the line first: a verify step (with a drafter step), then plain
        if not self._verify_measured(b) or (source == "model" and self._seconds(self._draft.get(b)) is None):
            return self.max_k
        if self._seconds(self._verify.get((b, 0))) is None:
            return 0
        judged = self._judged.get((b, source))
        if judged is None or judged[0] != self._version or judged[1] >= self.rejudge_every:
            best = self.best_k(batch_size, source)
            judged = self._judged[b, source] = [self._version, 0, best,
                                                self.probe_interval(batch_size, source) if best == 0 else 0]
        judged[1] += 1
        best, interval = judged[2], judged[3]
        veto = self._veto.get((b, source))
        if veto is not None:  # its drafting steps ran slower than plain decoding: plain for a while, probes aside
            best, interval = 0, (interval if best == 0 else veto[1])
            veto[0] -= 1
            if veto[0] <= 0:
                del self._veto[b, source]
        if best == 0:
            self._plain_steps[source] += 1
            if self._plain_steps[source] >= interval:
                self._plain_steps[source] = 0
                self.probing[source] = True
                return self.max_k
        return best

    def quiet_steps(self, batch_size: int, source: str = "model") -> int:
        """After a :meth:`choose_k` that chose plain decoding (0, not a probe): how many of the next
        calls are known to choose it again while only plain steps' timings come in (the judgement
        stands and no probe falls due), so that the caller may skip them (:meth:`skip`)."""
        judged = self._judged.get((batch_bucket(batch_size), source))
        if judged is None or judged[2] != 0 or self.probing[source] or judged[0] != self._version:
            return 0
        return max(0, min(self.rejudge_every - judged[1], judged[3] - self._plain_steps[source] - 1))

    def skip(self, batch_size: int, source: str, steps: int) -> None:
        """Count ``steps`` calls of :meth:`choose_k` the caller skipped (:meth:`quiet_steps`) as made."""
        judged = self._judged.get((batch_bucket(batch_size), source))
        if judged is not None:
            judged[1] += steps
        self._plain_steps[source] += steps

    def probe_size(self, batch_size: int) -> int:
        """Sequences that draft in a probe step of ``batch_size``."""
        return max(1, math.ceil(batch_size * self.probe_share))

    def best_k(self, batch_size: int, source: str = "model") -> int:
        """The K with the most expected tokens per second (both ends of the line measured), if it
        beats plain decoding by ``min_gain``; else 0."""
        costs = self.step_costs(batch_size, source)
        rate = [(t / c, -k) for k, (t, c) in enumerate(zip(self._step_tokens(source), costs))]  # tokens per second
        best = max(range(self.max_k + 1), key=rate.__getitem__)
        return best if rate[best][0] >= self.min_gain * rate[0][0] else 0
