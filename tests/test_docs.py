"""The documentation builds with warnings as errors, so it keeps up with the code."""
import pathlib
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'

def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
         '-d', str(tmp_path / 'doctrees'), str(DOCS), str(tmp_path / 'html')],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / 'html' / 'api.html').exists()
