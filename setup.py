"""Build script.

The Triton kernels live in the top-level ``kernels/`` folder and install as the
subpackage ``fastssl.kernels``; everything else is plain Python.
"""

from setuptools import setup

setup(
    packages=["fastssl", "fastssl.reference", "fastssl.kernels"],
    package_dir={"fastssl": "fastssl", "fastssl.kernels": "kernels"},
)
