#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The ones' complement sum of p[0..n) as 16-bit big-endian words, added to
   start and folded to 16 bits. Summed in native order, swapped at the end:
   the ones' complement sum does not depend on byte order (RFC 1071). */
static uint32_t
fold_sum(const unsigned char *p, Py_ssize_t n, uint64_t start)
{
    uint64_t acc = 0;
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        acc += h;
        p += 2;
        n -= 2;
    }
    if (n) {
        unsigned char last[2] = {p[0], 0};
        uint16_t h;
        memcpy(&h, last, 2);
        acc += h;
    }
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
#if PY_LITTLE_ENDIAN
    acc = ((acc & 0xFF) << 8) | (acc >> 8);
#endif
    acc += start;
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint32_t)acc;
}

/* The folded sum of the TCP pseudo-header of the IPv4 packet at ip (its
   addresses), for a TCP segment of tcp_len bytes. */
static uint32_t
pseudo_sum(const unsigned char *ip, Py_ssize_t tcp_len)
{
    unsigned char pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = 6;
    pseudo[10] = (unsigned char)(tcp_len >> 8);
    pseudo[11] = (unsigned char)tcp_len;
    return fold_sum(pseudo, 12, 0);
}

static PyObject *
csum_sum(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &view, &start))
        return NULL;
    uint32_t s;
    Py_BEGIN_ALLOW_THREADS
    s = fold_sum(view.buf, view.len, start);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(s);
}

/* A copy of an IPv4/TCP packet with its TCP checksum computed from scratch,
   or None when the headers do not frame a whole TCP segment (the caller's
   pure path then raises, saying why). It checks only what it needs to find
   the checksum: TCP options are not looked at. */
static PyObject *
csum_tcp_fixed(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len, ihl, total, doff;
    PyObject *out = NULL;
    if (n < 20 || (p[0] >> 4) != 4)
        goto none;
    ihl = (Py_ssize_t)(p[0] & 0x0F) * 4;
    total = ((Py_ssize_t)p[2] << 8) | p[3];
    if (ihl < 20 || total > n || total < ihl + 20 || p[9] != 6 || ((((unsigned)p[6] << 8) | p[7]) & 0x3FFF))
        goto none;
    doff = (Py_ssize_t)(p[ihl + 12] >> 4) * 4;
    if (doff < 20 || ihl + doff > total)
        goto none;
    out = PyBytes_FromStringAndSize((const char *)p, n);
    if (out != NULL) {
        unsigned char *q = (unsigned char *)PyBytes_AS_STRING(out);
        uint32_t s;
        q[ihl + 16] = q[ihl + 17] = 0;
        s = fold_sum(q + ihl, total - ihl, pseudo_sum(q, total - ihl));
        s = ~s & 0xFFFF;
        q[ihl + 16] = (unsigned char)(s >> 8);
        q[ihl + 17] = (unsigned char)s;
    }
    PyBuffer_Release(&view);
    return out;
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* Where a received TCP segment's checksum stands (tcpseg.checksum_state):
   0 the whole sum checks, 1 the field holds only the pseudo-header sum (a
   packet the kernel has not completed), 2 neither (changed on a link).
   tcp_off and total_len come from the caller's parse. */
static PyObject *
csum_tcp_state(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off, total;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &off, &total))
        return NULL;
    if (off < 20 || total > view.len || total > 0xFFFF || off > total - 20) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "offsets do not frame a TCP segment");
        return NULL;
    }
    const unsigned char *p = view.buf;
    uint32_t ps = pseudo_sum(p, total - off);
    uint32_t field = ((uint32_t)p[off + 16] << 8) | p[off + 17];
    long state;
    if (field == ps || (field == 0 && ps == 0xFFFF))
        state = 1;
    else
        state = fold_sum(p + off, total - off, ps) == 0xFFFF ? 0 : 2;
    PyBuffer_Release(&view);
    return PyLong_FromLong(state);
}

/* nfqueue.skb_info in C (see there): the NFQA_SKB_INFO flags of a queued
   packet's netlink message, 0 if absent before the payload, None if the
   message cannot be read. Every clone the backup gets passes here. */
static PyObject *
csum_skb_info(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len, end, off = 20;
    long flags = 0;
    int unreadable = 0;
    if (n < 20) {
        unreadable = 1;
        goto done;
    }
    uint32_t len32;
    memcpy(&len32, p, 4);
    end = (Py_ssize_t)len32 < n ? (Py_ssize_t)len32 : n;
    while (off + 4 <= end) {
        uint16_t alen, atype;
        memcpy(&alen, p + off, 2);
        memcpy(&atype, p + off + 2, 2);
        if (alen < 4) {
            unreadable = 1;
            break;
        }
        atype &= 0x3FFF;
        if (atype == 14) {  /* NFQA_SKB_INFO */
            if (alen < 8 || off + 8 > end)
                unreadable = 1;
            else
                flags = ((long)p[off + 4] << 24) | ((long)p[off + 5] << 16) | ((long)p[off + 6] << 8) | p[off + 7];
            break;
        }
        if (atype == 10)  /* NFQA_PAYLOAD */
            break;
        off += ((Py_ssize_t)alen + 3) & ~(Py_ssize_t)3;
    }
done:
    PyBuffer_Release(&view);
    if (unreadable)
        Py_RETURN_NONE;
    return PyLong_FromLong(flags);
}

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the output digest
   of divergence.py. Same convention as zlib.crc32: crc32c(b, crc32c(a)) is
   the CRC of a followed by b. x86-64 computes it with the SSE4.2 crc32
   instruction, 8 bytes at a time; elsewhere (or on a CPU without it) with a
   table, a byte at a time. Tested against the pure version in
   divergence.py. */
static uint32_t crc_table[256];
static int crc_hw;

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[i] = c;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t
crc_sw(uint32_t c, const unsigned char *p, Py_ssize_t n)
{
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

/* Arithmetic on the CRC register as a polynomial mod P, in the reflected
   bit order: bit 31 is the coefficient of x^0, bit 0 that of x^31. */
static uint32_t
crc_mulmod(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit)
            product ^= b;
        b = (b & 1u) ? (b >> 1) ^ 0x82F63B78u : b >> 1; /* b * x */
    }
    return product;
}

/* x^(8 n) mod P: what running the register over n zero bytes multiplies
   it by. */
static uint32_t
crc_zeros(Py_ssize_t n)
{
    uint32_t result = 1u << 31, power = 1u << 23; /* x^0, x^8 */
    for (; n; n >>= 1) {
        if (n & 1)
            result = crc_mulmod(result, power);
        power = crc_mulmod(power, power);
    }
    return result;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* One crc32 instruction takes 3 cycles but a new one can start every
   cycle: three independent streams over three thirds of a large buffer,
   joined with crc_zeros (the register of a||b is the register of a moved
   over len(b) zero bytes, xor that of b from 0), run some 2.5 times
   faster than one. */
__attribute__((target("sse4.2"))) static uint32_t
crc_sse42(uint32_t c, const unsigned char *p, Py_ssize_t n)
{
    uint64_t c64 = c;
    if (n >= 3 * 512) {
        Py_ssize_t third = (n / 3) & ~(Py_ssize_t)7;
        const unsigned char *q = p + third, *r = p + 2 * third;
        uint64_t c1 = 0, c2 = 0;
        for (Py_ssize_t i = 0; i < third; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + i, 8);
            memcpy(&w1, q + i, 8);
            memcpy(&w2, r + i, 8);
            c64 = __builtin_ia32_crc32di(c64, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
        }
        uint32_t shift = crc_zeros(third);
        c64 = crc_mulmod(shift, (uint32_t)c64) ^ (uint32_t)c1;
        c64 = crc_mulmod(shift, (uint32_t)c64) ^ (uint32_t)c2;
        p += 3 * third;
        n -= 3 * third;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

static PyObject *
csum_crc32c(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &value))
        return NULL;
    uint32_t c = ~(uint32_t)value;
    Py_BEGIN_ALLOW_THREADS
#if defined(__x86_64__) && defined(__GNUC__)
    if (crc_hw)
        c = crc_sse42(c, view.buf, view.len);
    else
#endif
        c = crc_sw(c, view.buf, view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(~c);
}

static PyObject *
csum_crc32c_hw(PyObject *self, PyObject *noargs)
{
    return PyBool_FromLong(crc_hw);
}

static PyMethodDef methods[] = {
    {"tcp_state", csum_tcp_state, METH_VARARGS, NULL},
    {"skb_info", csum_skb_info, METH_VARARGS, NULL},
    {"crc32c", csum_crc32c, METH_VARARGS, NULL},
    {"crc32c_in_hardware", csum_crc32c_hw, METH_NOARGS, NULL},
    {"ones_complement_sum", csum_sum, METH_VARARGS, NULL},
    {"tcp_fixed", csum_tcp_fixed, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csum", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__csum(void)
{
    crc_init();
    return PyModule_Create(&module);
}
