"""What a case reports: its rows (baseline, Blackgate, peers), its target and the verdict.

A row's ``value`` is the figure the target is judged on: the median time per
call (µs), requests per second, or bytes. ``median`` and ``p99`` are per call
(or per request) in µs where the case times calls; the memory case has only
``value``.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .harness import Timing

__all__ = ('Target', 'Row', 'CaseResult', 'MET', 'MARGINAL', 'MISSED', 'SKIPPED')

MET, MARGINAL, MISSED, SKIPPED = 'met', 'marginal', 'missed', 'skipped'


@dataclass
class Target:
    """How Blackgate's row is judged against the baseline's."""

    #: 'ratio_max': value / baseline <= limit;  'extra_us_max': value - baseline <= limit;
    #: 'ratio_min': value / baseline >= limit (``floor``: the at-worst bound);
    #: 'bytes_max': value <= limit
    kind: str
    limit: float
    text: str
    floor: Optional[float] = None


@dataclass
class Row:
    name: str
    role: str                     # 'baseline', 'blackgate', 'peer' or 'control'
    value: Optional[float]        # what the target judges (µs, rps or bytes)
    median: Optional[float] = None   # µs per call
    p99: Optional[float] = None      # µs per call
    ratio: Optional[float] = None    # value / baseline's value
    cpu: Optional[float] = None      # µs of CPU time (all threads) per call, median of rounds
    extra: Optional[float] = None    # value - baseline's value (µs)
    note: str = ''
    #: per-round ratios to (and differences from, µs) the baseline: how steady the figure is
    round_ratios: List[float] = field(default_factory=list)
    round_extras: List[float] = field(default_factory=list)


@dataclass
class CaseResult:
    key: str
    title: str
    baseline: str
    target: Target
    method: str
    rows: List[Row] = field(default_factory=list)
    #: extra conditions of the target (e.g. 'no thread used'): name -> passed
    checks: Dict[str, bool] = field(default_factory=dict)
    skipped: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def blackgate(self) -> Optional[Row]:
        return next((row for row in self.rows if row.role == 'blackgate'), None)

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return SKIPPED
        row = self.blackgate
        if row is None or row.value is None:
            return SKIPPED
        if not all(self.checks.values()):
            return MISSED
        return judge(self.target, row)

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data['verdict'] = self.verdict
        return data


def judge(target: Target, row: Row) -> str:
    """MET, MARGINAL (within the at-worst floor) or MISSED."""
    kind, limit = target.kind, target.limit
    if kind == 'ratio_max':
        return MET if row.ratio <= limit else MISSED
    if kind == 'extra_us_max':
        return MET if row.extra <= limit else MISSED
    if kind == 'ratio_min':
        if row.ratio >= limit:
            return MET
        if target.floor is not None and row.ratio >= target.floor:
            return MARGINAL
        return MISSED
    if kind == 'bytes_max':
        return MET if row.value <= limit else MISSED
    raise ValueError('unknown target kind %r' % (kind,))


def rows_from_timings(timings: List[Timing], baseline: str) -> List[Row]:
    """Rows in µs per call, with ratio and difference to ``baseline``; baseline first."""
    by_name = {t.name: t for t in timings}
    base = by_name[baseline]
    base_rounds = base.round_medians()
    ordered = [base] + [t for t in timings if t.name != baseline]
    rows = []
    for timing in ordered:
        median, p99 = timing.median / 1e3, timing.p99 / 1e3
        row = Row(timing.name, timing.role, median, median, p99, note=timing.note,
                  cpu=timing.cpu_median / 1e3)
        if timing is not base:
            row.ratio = timing.median / base.median
            row.extra = median - base.median / 1e3
            pairs = list(zip(timing.round_medians(), base_rounds))
            row.round_ratios = [mine / theirs for mine, theirs in pairs]
            row.round_extras = [(mine - theirs) / 1e3 for mine, theirs in pairs]
        rows.append(row)
    return rows
