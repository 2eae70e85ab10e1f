"""Build hook: the cffi extension (API mode, out-of-line) carries the VMM and the guest images."""
from setuptools import setup

setup(cffi_modules=["vlab/vmm/_build_native.py:ffibuilder"])
