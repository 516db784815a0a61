"""Every script in examples/ runs to completion on its own, in bounded time.

The scripts are found when the tests are collected, so an example added later
is covered without touching this file. Each runs in a fresh interpreter (the
one running the tests), from an empty working directory, as a user would run
it.
"""
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'
SCRIPTS = sorted(EXAMPLES.glob('*.py'))

#: Seconds an example may take. They are written to finish in a few seconds;
#: the margin is for a loaded machine.
TIME_LIMIT = 60


def test_there_are_examples():
    assert SCRIPTS, 'no scripts found in %s' % (EXAMPLES,)


@pytest.mark.parametrize('script', SCRIPTS, ids=[script.name for script in SCRIPTS])
def test_example_runs_to_completion(script, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONIOENCODING='utf-8')
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                                stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired as expired:
        pytest.fail('%s did not finish within %d s\n--- stdout ---\n%s\n--- stderr ---\n%s'
                    % (script.name, TIME_LIMIT, _text(expired.stdout), _text(expired.stderr)))
    stdout, stderr = _text(result.stdout), _text(result.stderr)
    report = '--- stdout ---\n%s\n--- stderr ---\n%s' % (stdout, stderr)
    assert result.returncode == 0, '%s exited with %d\n%s' % (script.name, result.returncode,
                                                             report)
    assert 'Traceback' not in stderr, report


def _text(output):
    if output is None:
        return ''
    return output.decode('utf-8', 'replace') if isinstance(output, bytes) else output


def test_gateway_yaml_runs(tmp_path):
    """examples/gateway.yaml is valid and serves (on a free port: --listen 127.0.0.1:0)."""
    import json
    import signal
    import urllib.request

    config = str(EXAMPLES / 'gateway.yaml')
    check = subprocess.run([sys.executable, '-m', 'blackgate.gateway', '--check', config],
                           capture_output=True, text=True, timeout=TIME_LIMIT)
    assert check.returncode == 0, check.stderr
    program = subprocess.Popen([sys.executable, '-m', 'blackgate.gateway', config,
                                '--listen', '127.0.0.1:0'], cwd=str(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    try:
        line = program.stdout.readline()
        assert 'listening on http://127.0.0.1:' in line, (line, program.stderr.read())
        url = line.split()[-4]
        with urllib.request.urlopen(url + '/blackgate/health', timeout=TIME_LIMIT) as response:
            assert json.loads(response.read())['routes'] == 3
    finally:
        program.send_signal(signal.SIGTERM)
        stdout, stderr = program.communicate(timeout=TIME_LIMIT)
    assert program.returncode == 0, stderr
    assert 'Traceback' not in stderr, stderr
