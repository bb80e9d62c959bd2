"""Only the C checksum helper is declared here; everything else is in setup.cfg.

The extension is optional: without a compiler the package installs anyway
and nfq_sttcp.tcpseg falls back to the pure-Python sum (same results)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nfq_sttcp._csum", ["nfq_sttcp/_csum.c"], optional=True)])
