"""What the docs and the README claim, checked against what the code does (issue 18, point 11).

The quoted error messages are the real ones, a snippet that says "open this URL"
listens there, the demo says which thresholds it shrank, and the README says
when the demo's dashboard lingers.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from blackgate import ConfigError, component

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'


def quoted_config_errors():
    """(statement, message) of each ``>>>`` example in configuration.rst that quotes a ConfigError."""
    lines = (DOCS / 'configuration.rst').read_text(encoding='utf-8').splitlines()
    examples, statement = [], None
    for line in lines:
        text = line.strip()
        if text.startswith('>>> '):
            statement = text[4:]
        elif text.startswith('... ') and statement is not None:
            statement += '\n' + text[4:]
        elif text.startswith('ConfigError: ') and statement is not None:
            examples.append((statement, text[len('ConfigError: '):]))
            statement = None
        elif text:
            statement = None
    return examples


EXAMPLES = quoted_config_errors()


def test_configuration_page_quotes_config_errors():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize('statement, quoted', EXAMPLES, ids=[s for s, _ in EXAMPLES])
def test_each_quoted_config_error_is_the_one_the_code_raises(statement, quoted):
    with pytest.raises(ConfigError) as caught:
        exec(statement, {'component': component})
    actual = str(caught.value)
    if quoted.endswith(', ...'):   # a long list of allowed keys, cut short on the page
        assert actual.startswith(quoted[:-len(', ...')]), actual
    else:
        assert actual == quoted


def test_the_observability_snippet_listens_where_it_says_to_look():
    text = (DOCS / 'observability.rst').read_text(encoding='utf-8')
    before, _, _ = text.partition('Then open ``http://127.0.0.1:')
    port = re.search(r'Then open ``http://127\.0\.0\.1:(\d+)/blackgate/``', text).group(1)
    snippet = before.rsplit('::', 1)[1]
    assert re.search(r"\.listen\(%s, '127\.0\.0\.1'\)" % (port,), snippet), snippet
    compile(snippet.replace('\n    ', '\n'), 'observability.rst', 'exec')


def run_demo(*args):
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONIOENCODING='utf-8')
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'demo.py')] + list(args),
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope='module')
def demo_output():
    return run_demo()   # stdout is a pipe here, as in CI


def test_the_demo_prints_the_thresholds_it_shrank(demo_output):
    line = next((line for line in demo_output.splitlines() if 'shrunk' in line), '')
    for setting, value in [('circuit_breaker_request_volume_threshold', '5'),
                           ('circuit_breaker_sleep_window', '2'),
                           ('metrics_rolling_window', '5')]:
        assert '%s=%s' % (setting, value) in line, demo_output[:2000]


def test_the_readme_says_the_dashboard_lingers_only_in_a_terminal(demo_output):
    readme = ' '.join((ROOT / 'README.rst').read_text(encoding='utf-8').split())
    assert 'stays up ten seconds more when run in a terminal' in readme
    assert 'stays up' not in demo_output   # a pipe: no lingering, as the README says
