"""The bpf() system call, for the kernel paths (fastpath.py, fastin.py): the only
place that creates maps, loads and pins programs, and reads or writes map
entries. No library: ctypes and the kernel's stable attribute layouts, and
nfq_sttcp/_bpfsys.c for the map element calls the daemons make per packet."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any, Optional

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _OBJ_PIN, _PROG_TEST_RUN = 0, 1, 2, 3, 5, 6, 10
MAP_TYPE_HASH = 1
_F_NO_PREALLOC = 1
_ANY = 0
_ATTR = 128
BPF_FS_MAGIC = 0xCAFE4A11

_libc = ctypes.CDLL(None, use_errno=True)


def _native() -> Any:
    """nfq_sttcp/_bpfsys.c (the map element calls), or None when it is not
    built or NFQ_STTCP_PURE_BPF=1 asks for the ctypes versions (to measure
    the difference)."""
    if os.environ.get("NFQ_STTCP_PURE_BPF"):
        return None
    try:
        from . import _bpfsys
    except ImportError:  # not built: ctypes does the same, some 3.5 us slower a call
        return None
    return _bpfsys


native = _native()


class BpfError(Exception):
    pass


def _call(cmd: int, attr: bytes, what: str, out: Optional[ctypes.Array] = None) -> int:
    if _NR_BPF is None:
        raise BpfError("%s: no bpf() system call number for %s" % (what, os.uname().machine))
    buf = out if out is not None else ctypes.create_string_buffer(attr.ljust(_ATTR, b"\0"), _ATTR)
    r = _libc.syscall(_NR_BPF, cmd, buf, _ATTR)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))
    return int(r)


def map_create(key_size: int, value_size: int, max_entries: int, name: str) -> int:
    attr = struct.pack("=IIIIIII16s", MAP_TYPE_HASH, key_size, value_size, max_entries, _F_NO_PREALLOC, 0, 0,
                       name.encode()[:15])
    try:
        return _call(_MAP_CREATE, attr, "creating map %s" % name)
    except OSError as e:
        raise BpfError("cannot create the eBPF map %s: %s (needs CAP_BPF or root, and a kernel "
                       "with CONFIG_BPF_SYSCALL)" % (name, e.strerror)) from None


def prog_load(insns: bytes, prog_type: int, name: str) -> int:
    """Load without the verifier's log; on a refusal, again with it, for the error."""
    lic = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(1 << 16)
    for level in (0, 1):
        attr = struct.pack("=IIQQIIQII16s", prog_type, len(insns) // 8, ctypes.addressof(code),
                           ctypes.addressof(lic), level, len(log) if level else 0, ctypes.addressof(log) if level else 0,
                           0, 0, name.encode()[:15])
        try:
            return _call(_PROG_LOAD, attr, "loading %s" % name)
        except OSError as e:
            err = e
    text = log.value.decode(errors="replace").strip().splitlines()
    raise BpfError("the kernel refused the eBPF program %s: %s%s" % (
        name, err.strerror, (" (verifier: %s)" % " | ".join(text[-6:])) if text else ""))


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    try:
        _call(_OBJ_PIN, struct.pack("=QII", ctypes.addressof(p), fd, 0), "pinning")
    except OSError as e:
        raise BpfError("cannot pin the eBPF program at %s: %s" % (path, e.strerror)) from None


def prog_test_run(fd: int, packet: bytes) -> int:
    """What the program returns for ``packet`` (from its IP header on), run
    by the kernel on a made-up skb (BPF_PROG_TEST_RUN): for tests."""
    data = ctypes.create_string_buffer(b"\0" * 14 + packet, 14 + len(packet))  # (an Ethernet header it skips)
    attr = struct.pack("=IIIIQQII", fd, 0, len(data), 0, ctypes.addressof(data), 0, 1, 0)
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR, b"\0"), _ATTR)
    _call(_PROG_TEST_RUN, b"", "test run", out=buf)
    return struct.unpack_from("=I", buf.raw, 4)[0]


def prog_test_run_frame(fd: int, frame: bytes) -> tuple[int, bytes]:
    """What a tc program returns for an Ethernet ``frame``, and the frame as
    it left it (BPF_PROG_TEST_RUN): for tests."""
    data = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    attr = struct.pack("=IIIIQQII", fd, 0, len(frame), len(out), ctypes.addressof(data), ctypes.addressof(out), 1, 0)
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR, b"\0"), _ATTR)
    _call(_PROG_TEST_RUN, b"", "test run", out=buf)
    (retval,), (size,) = struct.unpack_from("=I", buf.raw, 4), struct.unpack_from("=I", buf.raw, 12)
    return retval, out.raw[:size]


def _elem(cmd: int, fd: int, key: bytes, value: Optional[ctypes.Array] = None, flags: int = 0) -> int:
    k = ctypes.create_string_buffer(key, len(key))
    attr = struct.pack("=IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(value) if value is not None else 0,
                       flags)
    return _call(cmd, attr, "map element")


# The map element calls: ``key`` and ``value`` must be the sizes the map was
# made with (the kernel reads and writes that many bytes at them).

def map_update(fd: int, key: bytes, value: bytes) -> None:
    if native is not None:
        native.update(fd, key, value, _ANY)
        return
    v = ctypes.create_string_buffer(value, len(value))
    _elem(_MAP_UPDATE, fd, key, v, _ANY)


def map_lookup(fd: int, key: bytes, size: int) -> Optional[bytes]:
    if size < 1:
        raise ValueError("map_lookup: the value size must be positive, not %d" % size)
    if native is not None:
        return native.lookup(fd, key, size)  # type: ignore[no-any-return]
    v = ctypes.create_string_buffer(size)
    try:
        _elem(_MAP_LOOKUP, fd, key, v)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> None:
    if native is not None:
        native.delete(fd, key)
        return
    try:
        _elem(_MAP_DELETE, fd, key)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def is_bpffs(path: str) -> bool:
    st = _Statfs()
    if _libc.statfs(path.encode(), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def ensure_bpffs(path: str) -> bool:
    """A bpf file system at ``path`` (made if needed); True if we mounted it."""
    made = not os.path.isdir(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if is_bpffs(path):
        return False
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        e = ctypes.get_errno()
        if made:
            os.rmdir(path)
        raise BpfError("cannot mount a bpf file system at %s: %s" % (path, os.strerror(e)))
    return True


def unmount(path: str) -> None:
    _libc.umount2(path.encode(), 2)  # MNT_DETACH
