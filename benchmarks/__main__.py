"""Run every case of issue 6, Blackgate beside its baseline and the peers, in one run.

    python -m benchmarks                 # the full run (several minutes)
    python -m benchmarks --quick         # a smoke check, under a minute
    python -m benchmarks --only execute,queue --out /tmp/r.json

Prints each case as it finishes and a summary table at the end; writes the
results to ``benchmarks/results.json`` (``--out``) and, if matplotlib is
installed, a chart beside it (``--chart``). The exit status is 0 unless a
case could not run at all: a missed target is a finding, not an error.
Figures are ratios to a baseline measured in the same run, never absolute
times; on a shared machine, read the load average printed with them.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import tornado

import blackgate

from . import peers
from .cases import CASES
from .footprint import case_memory
from .gateway import case_gateway
from .plan import FULL, QUICK, Plan
from .report import print_case, print_summary, write_chart, write_json
from .results import CaseResult, Target

HERE = os.path.dirname(os.path.abspath(__file__))

#: every case, in the issue's order
ALL_CASES: Dict[str, Callable[[Plan], CaseResult]] = dict(CASES, memory=case_memory,
                                                          gateway=case_gateway)


def _loadavg() -> str:
    try:
        return ' '.join('%.2f' % value for value in os.getloadavg())
    except OSError:
        return 'unknown'


def _git_revision() -> str:
    try:
        done = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=HERE,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return done.stdout.strip() or 'unknown'


def _meta(mode: str, plan: Plan) -> Dict[str, Any]:
    return {
        'mode': mode,
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'python': platform.python_version(),
        'implementation': platform.python_implementation(),
        'platform': platform.platform(),
        'cpus': os.cpu_count(),
        'blackgate': blackgate.__version__,
        'revision': _git_revision(),
        'tornado': tornado.version,
        'peers': peers.status(),
        'peer_versions': peers.versions(),
        'plan': plan.__dict__,
        'loadavg_start': _loadavg(),
    }


def _crashed(key: str, exc: BaseException) -> CaseResult:
    case = CaseResult(key, key, '-', Target('ratio_max', 0, '-'), '-')
    case.skipped = 'error: %s: %s' % (type(exc).__name__, exc)
    return case


def run(keys: List[str], plan: Plan) -> List[CaseResult]:
    """Run the cases named by ``keys``, printing each as it finishes."""
    results = []
    for key in keys:
        started = time.monotonic()
        try:
            case = ALL_CASES[key](plan)
        except Exception as exc:   # report it and go on: one broken case must not hide the rest
            traceback.print_exc()
            case = _crashed(key, exc)
            case.details['error'] = True
        case.details['seconds'] = round(time.monotonic() - started, 1)
        case.details['loadavg_after'] = _loadavg()
        print_case(case)
        sys.stdout.flush()
        results.append(case)
    return results


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='fewer rounds and calls: a smoke check in under a minute')
    parser.add_argument('--out', default=os.path.join(HERE, 'results.json'),
                        help='JSON results (default: benchmarks/results.json)')
    parser.add_argument('--chart', help='PNG chart (default: beside --out, .png)')
    parser.add_argument('--no-chart', action='store_true', help='write no chart')
    parser.add_argument('--only', help='comma-separated cases: ' + ', '.join(ALL_CASES))
    parser.add_argument('--load', choices=('auto', 'python'), default='auto',
                        help="gateway load: wrk if installed ('auto'), or the Python one")
    args = parser.parse_args(argv)
    keys = args.only.split(',') if args.only else list(ALL_CASES)
    unknown = [key for key in keys if key not in ALL_CASES]
    if unknown:
        parser.error('unknown case %s; choose from %s' % (', '.join(unknown),
                                                           ', '.join(ALL_CASES)))
    args.keys = keys
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    plan = (QUICK if args.quick else FULL).but(proxy_load=args.load)
    mode = 'quick' if args.quick else 'full'
    meta = _meta(mode, plan)
    print('Blackgate %s (%s), Python %s, %d CPUs, load average %s; %s run'
          % (meta['blackgate'], meta['revision'], meta['python'], meta['cpus'],
             meta['loadavg_start'], mode))
    started = time.monotonic()
    cases = run(args.keys, plan)
    meta['loadavg_end'] = _loadavg()
    meta['seconds'] = round(time.monotonic() - started, 1)
    data = {'meta': meta, 'cases': [case.to_json() for case in cases]}
    print_summary(data)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, data)
    print('\nresults: %s (%.0f s)' % (args.out, meta['seconds']))
    if not args.no_chart:
        chart = write_chart(args.chart or os.path.splitext(args.out)[0] + '.png', data)
        print('chart: %s' % (chart or 'none (pip install matplotlib)',))
    return 1 if any(case.details.get('error') for case in cases) else 0


if __name__ == '__main__':
    sys.exit(main())
