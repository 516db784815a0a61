"""How users are told to install Blackgate: from a checkout or a VCS URL, never by name.

The package index's ``blackgate`` is another project (0.3.0, ``tornado<6``, no
``Command``): ``pip install blackgate`` gives a user the wrong library.
"""
import pathlib
import re

import blackgate

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: ``pip install`` (any flags) followed by the bare name, quoted or not, with or
#: without extras; a direct reference (``blackgate @ git+...``) is fine.
BY_NAME = re.compile(r"""pip3? install\s+(?:-\S+\s+)*['"]?blackgate(?:\[[^\]]*\])?['"]?(?!\s*@)""")

#: Owned by another engineer's branch at the time of writing (fleet mode's store);
#: its ImportError message still names the extra by package name.
NOT_YET: set = set()


def user_facing_files():
    yield ROOT / 'README.rst'
    yield ROOT / 'HISTORY.rst'
    for pattern in ('docs/*.rst', 'examples/*.py', 'blackgate/*.py'):
        yield from sorted(ROOT.glob(pattern))


def test_no_file_tells_users_to_install_blackgate_by_name_from_the_package_index():
    found = []
    for path in user_facing_files():
        relative = path.relative_to(ROOT).as_posix()
        if relative in NOT_YET:
            continue
        for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
            if BY_NAME.search(line):
                found.append('%s:%d: %s' % (relative, number, line.strip()))
    assert found == []


def test_the_pattern_catches_the_spellings_users_were_shown():
    for line in ("pip install 'blackgate[prometheus]'", 'pip install blackgate[redis]',
                 'pip install -U blackgate'):
        assert BY_NAME.search(line), line
    for line in ("pip install -e '.[prometheus]'", "pip install 'blackgate @ git+https://x/y'",
                 'pip install -r benchmarks/requirements.txt'):
        assert not BY_NAME.search(line), line


def test_version_sorts_above_the_other_projects_release_on_the_index():
    release = re.match(r'(\d+)\.(\d+)\.(\d+)', blackgate.__version__)
    assert release is not None, blackgate.__version__
    assert tuple(map(int, release.groups())) > (0, 3, 0)


def test_the_quick_start_says_why_never_by_name():
    quickstart = (ROOT / 'docs' / 'quickstart.rst').read_text(encoding='utf-8')
    assert 'pip install -e .' in quickstart
    assert 'Never install it by name from the package index' in quickstart
