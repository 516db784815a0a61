"""Sphinx configuration for Blackgate's documentation.

Build with warnings as errors, from the repository root::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)

# autodoc imports the package from this checkout, installed or not.
sys.path.insert(0, ROOT)


def _read_version():
    # Read __version__ without importing the package, as setup.py does.
    with open(os.path.join(ROOT, 'blackgate', '__init__.py'), encoding='utf-8') as f:
        match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", f.read(), re.MULTILINE)
    if not match:
        raise RuntimeError('__version__ not found in blackgate/__init__.py')
    return match.group(1)


project = 'Blackgate'
author = 'The Blackgate authors'
copyright = 'The Blackgate authors, MIT License'
release = _read_version()
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.viewcode',
]

root_doc = 'index'
exclude_patterns = ['_build', 'examples']
templates_path = []
language = 'en'

# -- autodoc ------------------------------------------------------------------

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True

# -- HTML ---------------------------------------------------------------------

html_theme = 'alabaster'
html_title = 'Blackgate %s' % (release,)
html_theme_options = {
    'description': "Hystrix's latency and fault tolerance for Tornado",
    'fixed_sidebar': False,
    'show_powered_by': False,
    'page_width': '1100px',
}
html_static_path = ['_static']   # custom.css, which alabaster links by name
html_show_sourcelink = False
