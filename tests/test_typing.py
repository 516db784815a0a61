"""The package type-checks clean, so its hints (and py.typed) can be trusted by users."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_is_clean_on_the_package():
    result = subprocess.run([sys.executable, '-m', 'mypy', '--no-error-summary', 'blackgate'],
                            capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
