import io
import os
import re

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def read(*parts):
    with io.open(os.path.join(HERE, *parts), encoding='utf-8') as f:
        return f.read()


def find_version():
    # Read the version without importing the package: its dependencies
    # may not be installed yet when setup.py runs.
    match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""",
                      read('blackgate', '__init__.py'), re.MULTILINE)
    if not match:
        raise RuntimeError('__version__ not found in blackgate/__init__.py')
    return match.group(1)


setup(
    name='blackgate',
    version=find_version(),
    description='Hystrix-style latency and fault tolerance for Tornado: '
                'bulkheads, timeouts, circuit breakers and fallbacks.',
    long_description=read('README.rst'),
    long_description_content_type='text/x-rst',
    author='The Blackgate authors',
    license='MIT',
    packages=find_packages(exclude=['tests', 'tests.*', 'examples', 'examples.*',
                                    'benchmarks', 'benchmarks.*']),
    package_data={'blackgate': ['py.typed', 'static/*']},
    include_package_data=True,
    zip_safe=False,
    python_requires='>=3.9',
    install_requires=[
        'tornado>=6.1',
        'requests',
        'PyYAML>=5.1',   # the gateway program's file (blackgate.gateway), read with safe_load
    ],
    entry_points={
        # The testing kit's fixtures (blackgate_component, blackgate_clock) for pytest users.
        'pytest11': ['blackgate = blackgate.testing'],
        # The gateway program: blackgate-gateway gateway.yaml (docs/gateway.rst).
        'console_scripts': ['blackgate-gateway = blackgate.gateway:main'],
    },
    extras_require={
        'test': [
            'pytest<10',
            'pytest-tornado',
            'hypothesis',
            'sphinx',   # tests/test_docs.py builds the docs with warnings as errors
            'mypy',     # tests/test_typing.py type-checks the package
            'redis',    # tests/test_fleet.py (fleet mode) against a local redis-server
            # pytest-tornado 0.8.1 imports pkg_resources, which setuptools 82
            # removed; venvs of Python 3.12+ get the newest setuptools.
            'setuptools<82',
            'prometheus-client',   # tests/test_prometheus.py
            'opentelemetry-sdk',   # tests/test_tracing.py (its in-memory span exporter)
        ],
        'prometheus': ['prometheus-client>=0.9'],
        'otel': ['opentelemetry-api'],
        'redis': ['redis'],
        'docs': ['sphinx'],
    },
    classifiers=[
        'Development Status :: 3 - Alpha',
        'Intended Audience :: Developers',
        'Operating System :: OS Independent',
        'Framework :: Tornado',
        'Programming Language :: Python',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Internet :: WWW/HTTP',
        'Topic :: Software Development :: Libraries :: Python Modules',
        'Topic :: System :: Networking',
        'Typing :: Typed',
    ],
)
