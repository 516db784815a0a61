"""Tables (plain text and reStructuredText), the JSON file and the optional PNG chart.

Turn a saved run into the docs' tables again::

    python -m benchmarks.report benchmarks/results.json --rst
    python -m benchmarks.report benchmarks/results.json --rst-into docs/performance.rst
"""
import argparse
import json
import re
from typing import Any, Dict, List, Optional, Sequence

from .peers import PEERS
from .results import CaseResult

__all__ = ('print_case', 'print_summary', 'summary_rows', 'text_table', 'rst_table',
           'rst_results', 'write_json', 'write_chart')


# -- how a figure reads ------------------------------------------------------------------------

def _us(value: Optional[float]) -> str:
    if value is None:
        return '-'
    return '%.2f us' % value if value < 1000 else '%.2f ms' % (value / 1000)


def _figure(case: Dict[str, Any], row: Optional[Dict[str, Any]]) -> str:
    """A row's figure in the unit of the case's target: ratio, µs more, or bytes."""
    if row is None:
        return '-'
    kind = case['target']['kind']
    if kind == 'bytes_max':
        return '%.0f B' % row['value']
    if row.get('ratio') is None:
        return '-'
    if kind == 'extra_us_max':
        return '%+.2f us' % row['extra']
    return '%.3fx' % row['ratio']


def _row(case: Dict[str, Any], role: str, name: Optional[str] = None
         ) -> Optional[Dict[str, Any]]:
    for row in case['rows']:
        if row['role'] == role and (name is None or row['name'] == name):
            return row
    return None


def _time(case: Dict[str, Any], row: Optional[Dict[str, Any]]) -> str:
    if row is None:
        return '-'
    if case['target']['kind'] == 'bytes_max':
        return '%.0f B' % row['value']
    if case['target']['kind'] == 'ratio_min':
        return '%.0f rps, p50 %s p99 %s' % (row['value'], _us(row['median']), _us(row['p99']))
    return '%s / %s' % (_us(row['median']), _us(row['p99']))


# -- tables ----------------------------------------------------------------------------------

SUMMARY_HEADER = ('case', 'baseline (median / p99)', 'Blackgate (median / p99)',
                  'Blackgate vs baseline', 'target', 'verdict')


def summary_rows(cases: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """One row per case: baseline and Blackgate times, the figure, the target, the verdict."""
    rows = []
    for case in cases:
        if case['skipped']:
            rows.append([case['title'], '-', '-', '-', case['target']['text'],
                         'skipped: ' + case['skipped']])
            continue
        failed = [name for name, passed in case['checks'].items() if not passed]
        verdict = case['verdict'] + ('' if not failed else ' (failed: %s)' % '; '.join(failed))
        rows.append([case['title'], _time(case, _row(case, 'baseline')),
                     _time(case, _row(case, 'blackgate')), _figure(case, _row(case, 'blackgate')),
                     case['target']['text'], verdict])
    return rows


def peer_rows(cases: Sequence[Dict[str, Any]], status: Dict[str, Optional[str]]
              ) -> List[List[str]]:
    """One row per case: the target's figure for Blackgate and for each peer."""
    rows = []
    for case in cases:
        if case['skipped']:
            continue
        line = [case['title'], _figure(case, _row(case, 'blackgate'))]
        for peer in PEERS:
            if status.get(peer):
                line.append('n/a')
            else:
                line.append(_figure(case, _row(case, 'peer', peer)))
        rows.append(line)
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ['  '.join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, ['-' * w for w in widths]] + list(rows)]
    return '\n'.join(lines)


def rst_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The table as a reStructuredText ``list-table`` (long cells wrap)."""
    out = ['.. list-table::', '   :header-rows: 1', '']
    for line in [header] + list(rows):
        out.append('   * - %s' % (_rst_cell(line[0]),))
        out.extend('     - %s' % (_rst_cell(cell),) for cell in line[1:])
    return '\n'.join(out)


_RST_WORDS = (('<=', '≤'), ('>=', '≥'), ('->', '→'))


def _rst_cell(text: str) -> str:
    text = str(text)
    if text in ('', '-', 'n/a'):
        return '–'
    text = re.sub(r'(\d) us\b', '\\1 µs', text).replace('*', '\\*').replace('|', '\\|')
    text = re.sub(r'(\d)x\b', '\\1×', text)
    for ascii_, symbol in _RST_WORDS:
        text = text.replace(ascii_, symbol)
    return text


def rst_results(data: Dict[str, Any]) -> str:
    """The docs' results block: when and where it ran, the summary, the peers."""
    meta = data['meta']
    lines = ['A %s run on %s: Python %s, Blackgate %s (revision %s), %d CPUs, load '
             'average %s at the start and %s at the end.'
             % (meta['mode'], meta['date'][:10], meta['python'], meta['blackgate'],
                meta['revision'], meta['cpus'], meta['loadavg_start'], meta['loadavg_end']),
             '', rst_table(SUMMARY_HEADER, summary_rows(data['cases'])), '',
             'The same figure for the peers (the ratio, or µs more than the baseline), '
             'measured in the same rounds:', '',
             rst_table(('case', 'Blackgate') + PEERS, peer_rows(data['cases'], meta['peers']))]
    versions = ', '.join('%s %s' % item for item in sorted(meta.get('peer_versions', {}).items()))
    if versions:
        lines += ['', 'Peer versions: %s.' % (versions,)]
    for peer, reason in meta['peers'].items():
        if reason:
            lines += ['', '%s was left out: %s.' % (peer, reason)]
    return '\n'.join(lines)


def _spread(kind: str, row: Dict[str, Any]) -> str:
    """The lowest and highest per-round figure, in the unit of the target."""
    if kind == 'extra_us_max' and row['round_extras']:
        return '%+.2f..%+.2f us' % (min(row['round_extras']), max(row['round_extras']))
    if row['round_ratios']:
        return '%.3f-%.3fx' % (min(row['round_ratios']), max(row['round_ratios']))
    return ''


def print_case(case: CaseResult) -> None:
    """The detailed block of one case, as it finishes."""
    data = case.to_json()
    print('\n== %s  [target %s: %s]' % (case.title, case.target.text, data['verdict'].upper()))
    if case.skipped:
        print('   skipped: %s' % (case.skipped,))
        return
    print('   %s' % (case.method,))
    header = ('candidate', 'median', 'p99', 'vs baseline', 'per-round range', 'CPU/call', 'note')
    rows = []
    for row in data['rows']:
        spread = _spread(case.target.kind, row)
        name = row['name'] + (' (baseline)' if row['role'] == 'baseline' else '')
        if case.target.kind == 'bytes_max':
            rows.append([name, '%.0f B' % row['value'], '', '', '', '', row['note']])
        else:
            rows.append([name, _us(row['median']), _us(row['p99']),
                         _figure(data, row) if row['role'] != 'baseline' else '', spread,
                         _us(row.get('cpu')), row['note']])
    print('\n'.join('   ' + line for line in text_table(header, rows).splitlines()))
    for name, passed in case.checks.items():
        if not passed:
            print('   CHECK FAILED: %s' % (name,))
    for note in case.notes:
        print('   note: %s' % (note,))


def print_summary(data: Dict[str, Any]) -> None:
    meta = data['meta']
    print('\n' + '=' * 78)
    print('Summary (%s run; Python %s; %d CPUs; load average %s at start, %s at end)'
          % (meta['mode'], meta['python'], meta['cpus'], meta['loadavg_start'],
             meta['loadavg_end']))
    print(text_table(SUMMARY_HEADER, summary_rows(data['cases'])))
    print('\nThe same figure for the peers (ratio, or us more than the baseline):')
    print(text_table(('case', 'Blackgate') + PEERS, peer_rows(data['cases'], meta['peers'])))
    for peer, reason in meta['peers'].items():
        if reason:
            print('%s: %s' % (peer, reason))


# -- files -----------------------------------------------------------------------------------

def write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, 'w') as out:
        json.dump(data, out, indent=1, default=str)
        out.write('\n')


def write_chart(path: str, data: Dict[str, Any]) -> Optional[str]:
    """A PNG of every case's figure against its target; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [case for case in data['cases'] if not case['skipped']]
    columns = 3
    rows = (len(cases) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(15, 3.2 * rows), squeeze=False)
    for axis, case in zip(axes.flat, cases):
        _chart_case(axis, case)
    for axis in list(axes.flat)[len(cases):]:
        axis.axis('off')
    meta = data['meta']
    figure.suptitle('Blackgate vs baseline and peers (%s run, load average %s)'
                    % (meta['mode'], meta['loadavg_start']), fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _chart_case(axis, case: Dict[str, Any]) -> None:
    kind = case['target']['kind']
    rows = [row for row in case['rows'] if row['role'] != 'baseline']
    if kind == 'bytes_max':
        values, label = [row['value'] for row in rows], 'bytes per key'
    elif kind == 'extra_us_max':
        values, label = [row['extra'] for row in rows], 'us more than baseline'
    else:
        values, label = [row['ratio'] for row in rows], 'x baseline'
    names = [row['name'].replace('Blackgate ', 'Blackgate\n') for row in rows]
    colours = ['tab:blue' if row['role'] == 'blackgate' else 'tab:gray' for row in rows]
    bars = axis.barh(range(len(rows)), values, color=colours)
    axis.bar_label(bars, labels=[_figure(case, row) for row in rows], fontsize=7, padding=2)
    axis.margins(x=0.2)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels(names, fontsize=7)
    axis.invert_yaxis()
    axis.axvline(case['target']['limit'], color='tab:red', linestyle='--', linewidth=1)
    if kind in ('ratio_max', 'ratio_min'):
        axis.axvline(1.0, color='black', linewidth=0.6)
    axis.set_xlabel(label, fontsize=8)
    axis.set_title('%s\n(%s: %s)' % (case['title'], case['target']['text'], case['verdict']),
                   fontsize=8)
    axis.tick_params(axis='x', labelsize=7)


_START = '.. RESULTS START'
_END = '.. RESULTS END'


def rewrite_rst(path: str, data: Dict[str, Any]) -> None:
    """Replace the results block of a docs page (between its START and END comments)."""
    with open(path, encoding='utf-8') as source:
        text = source.read()
    start, end = text.index(_START), text.index(_END)
    start = text.index('\n', start) + 1
    with open(path, 'w', encoding='utf-8') as out:
        out.write(text[:start] + '\n' + rst_results(data) + '\n\n' + text[end:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results', help='a JSON file written by python -m benchmarks')
    parser.add_argument('--rst', action='store_true', help='print reStructuredText tables')
    parser.add_argument('--chart', help='write the PNG chart to this path')
    parser.add_argument('--rst-into', metavar='PAGE',
                        help='rewrite the results block of this docs page in place, e.g. '
                             'docs/performance.rst')
    args = parser.parse_args(argv)
    with open(args.results) as source:
        data = json.load(source)
    if args.chart:
        print(write_chart(args.chart, data) or 'matplotlib is not installed: no chart')
    if args.rst_into:
        rewrite_rst(args.rst_into, data)
        print('rewrote the results block of %s' % (args.rst_into,))
    elif args.rst:
        print(rst_results(data))
    else:
        print_summary(data)


if __name__ == '__main__':
    main()
