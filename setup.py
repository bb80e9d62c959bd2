"""Only the C helpers are declared here; everything else is in setup.cfg.

The extensions are optional: without a compiler the package installs anyway,
nfq_sttcp.tcpseg falls back to the pure-Python sum and nfq_sttcp.bpf to
ctypes (same results, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nfq_sttcp._csum", ["nfq_sttcp/_csum.c"], optional=True),
                   Extension("nfq_sttcp._bpfsys", ["nfq_sttcp/_bpfsys.c"], optional=True)])
