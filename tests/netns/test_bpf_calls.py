"""The bpf() map element calls (bpf.py): the C versions (_bpfsys.c) and the
ctypes ones, on real maps in this kernel, give the same answers and the
same errors. The daemons make these calls per packet on the kernel paths."""

import errno
import os

import pytest

from nfq_sttcp import bpf


@pytest.fixture
def hash_map():
    fd = bpf.map_create(8, 24, 4, "t_calls")
    try:
        yield fd
    finally:
        os.close(fd)


def _use(impl, monkeypatch):
    if impl == "ctypes":
        monkeypatch.setattr(bpf, "native", None)
    else:
        assert bpf.native is not None, "the C calls are not built: these cases would test ctypes twice"


def test_the_c_calls_are_built_and_in_use():
    """setup.py builds nfq_sttcp/_bpfsys.c (optional: a failed build would
    only make every map call slower, so this test is what notices)."""
    import nfq_sttcp._bpfsys  # noqa: F401  (fails here if the build step is missing)

    if os.environ.get("NFQ_STTCP_PURE_BPF"):
        pytest.fail("NFQ_STTCP_PURE_BPF is set: the tests would not run the C calls", pytrace=False)
    assert bpf.native is nfq_sttcp._bpfsys


@pytest.mark.parametrize("impl", ["c", "ctypes"])
def test_lookup_update_delete_on_a_real_map(hash_map, monkeypatch, impl):
    _use(impl, monkeypatch)
    k1, k2 = b"key-0001", b"key-0002"
    assert bpf.map_lookup(hash_map, k1, 24) is None, "no entry yet"
    bpf.map_update(hash_map, k1, b"a" * 24)
    bpf.map_update(hash_map, k2, b"b" * 24)
    assert bpf.map_lookup(hash_map, k1, 24) == b"a" * 24
    bpf.map_update(hash_map, k1, b"c" * 24)
    assert bpf.map_lookup(hash_map, k1, 24) == b"c" * 24
    assert bpf.map_lookup(hash_map, k2, 24) == b"b" * 24
    bpf.map_delete(hash_map, k1)
    assert bpf.map_lookup(hash_map, k1, 24) is None
    bpf.map_delete(hash_map, k1)  # deleting what is gone is no error
    assert bpf.map_lookup(hash_map, k2, 24) == b"b" * 24


@pytest.mark.parametrize("impl", ["c", "ctypes"])
def test_the_kernel_refusals_come_out_as_the_same_errors(hash_map, monkeypatch, impl):
    _use(impl, monkeypatch)
    for i in range(4):
        bpf.map_update(hash_map, b"key-%04d" % i, b"v" * 24)
    with pytest.raises(OSError) as full:
        bpf.map_update(hash_map, b"key-9999", b"v" * 24)
    assert full.value.errno == errno.E2BIG, "a fifth entry in a map of four"
    with pytest.raises(OSError) as bad:
        bpf.map_lookup(999999, b"key-0000", 24)
    assert bad.value.errno == errno.EBADF
    with pytest.raises(OSError) as bad:
        bpf.map_delete(999999, b"key-0000")
    assert bad.value.errno == errno.EBADF
    with pytest.raises(OSError) as bad:
        bpf.map_update(999999, b"key-0000", b"v" * 24)
    assert bad.value.errno == errno.EBADF


@pytest.mark.parametrize("impl", ["c", "ctypes"])
def test_a_key_that_is_not_bytes_is_a_type_error(hash_map, monkeypatch, impl):
    _use(impl, monkeypatch)
    with pytest.raises(TypeError):
        bpf.map_lookup(hash_map, "key-0000", 24)
    with pytest.raises(TypeError):
        bpf.map_update(hash_map, "key-0000", b"v" * 24)


@pytest.mark.parametrize("impl", ["c", "ctypes"])
def test_a_value_size_of_nothing_is_refused_before_the_kernel_writes(hash_map, monkeypatch, impl):
    """(The kernel writes the map's value size at the buffer, whatever its
    length: 0 would have it write into an empty bytes object.)"""
    _use(impl, monkeypatch)
    bpf.map_update(hash_map, b"key-0000", b"v" * 24)
    for size in (0, -1):
        with pytest.raises(ValueError):
            bpf.map_lookup(hash_map, b"key-0000", size)
    assert bpf.map_lookup(hash_map, b"key-0000", 24) == b"v" * 24
