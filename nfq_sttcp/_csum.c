#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *
csum_sum(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &view, &start))
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    uint64_t acc = 0;
    Py_BEGIN_ALLOW_THREADS
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
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
#if PY_LITTLE_ENDIAN
    acc = ((acc & 0xFF) << 8) | (acc >> 8);
#endif
    acc += start;
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return PyLong_FromUnsignedLongLong(acc);
}

static PyMethodDef methods[] = {
    {"ones_complement_sum", csum_sum, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csum", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__csum(void)
{
    return PyModule_Create(&module);
}
