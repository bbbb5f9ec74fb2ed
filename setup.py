"""Build script.

The Triton kernels live in the top-level ``kernels/`` folder and install as the
subpackage ``fastssl.kernels``; everything else is plain Python under ``fastssl/``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastssl", "fastssl.*"]), "fastssl.kernels"],
    package_dir={"fastssl": "fastssl", "fastssl.kernels": "kernels"},
)
