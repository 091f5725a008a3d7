/*
 * rev_tasks.core._popcount: Hamming distances between packed-bit signatures.
 *
 * Why C: in numpy a single 10,000-bit comparison costs ~2.4 us, almost all of it the
 * dispatch of three or four ufunc calls; one-vs-10,000 is bounded by numpy's temporaries.
 * Here one call does a buffer lookup per argument and a popcount loop over 64-bit words.
 *
 * - Arguments come through the buffer protocol (numpy arrays, bytes, memoryview ...) and
 *   must be C-contiguous, format 'B' (uint8); anything else raises TypeError/ValueError/
 *   BufferError and rev_tasks.core.hamming falls back to its validating numpy path.
 * - Words are loaded with memcpy, so any alignment is safe (compilers emit a plain load).
 * - __builtin_popcountll becomes one POPCNT instruction when built with -mpopcnt (setup.py
 *   adds it only when the compiler and the build CPU support it); otherwise the compiler's
 *   portable bit-twiddling version, which is still exact.
 * - The word loop is unrolled by four with four accumulators, so the adds do not form one
 *   dependency chain.
 * - one_to_many releases the GIL when the work is large enough for that to matter.
 * - Where setup.py found that the compiler supports it (REV_AVX512_POPCNT), a second kernel
 *   uses AVX-512 VPOPCNTDQ (8 words per instruction) and is chosen at import time only when
 *   the running CPU and OS support it (__builtin_cpu_supports); measured ~2.2x the scalar
 *   kernel for one-vs-10,000 on a Zen 4 core. Everything else keeps the scalar kernel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Release the GIL in one_to_many above this many bytes of B (~10 us of work). */
#define NOGIL_MIN_BYTES (256 * 1024)

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline int64_t hamming_bytes(const unsigned char *a, const unsigned char *b, Py_ssize_t n)
{
    uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        c0 += (uint64_t)__builtin_popcountll(load64(a + i) ^ load64(b + i));
        c1 += (uint64_t)__builtin_popcountll(load64(a + i + 8) ^ load64(b + i + 8));
        c2 += (uint64_t)__builtin_popcountll(load64(a + i + 16) ^ load64(b + i + 16));
        c3 += (uint64_t)__builtin_popcountll(load64(a + i + 24) ^ load64(b + i + 24));
    }
    for (; i + 8 <= n; i += 8) {
        c0 += (uint64_t)__builtin_popcountll(load64(a + i) ^ load64(b + i));
    }
    for (; i < n; i++) {
        c1 += (uint64_t)__builtin_popcount((unsigned int)(a[i] ^ b[i]));
    }
    return (int64_t)(c0 + c1 + c2 + c3);
}

#if defined(REV_AVX512_POPCNT)
#include <immintrin.h>

__attribute__((target("avx512f,avx512vpopcntdq"))) static int64_t
hamming_bytes_avx512(const unsigned char *a, const unsigned char *b, Py_ssize_t n)
{
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    Py_ssize_t i = 0;
    int64_t c;
    for (; i + 128 <= n; i += 128) {
        __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i));
        __m512i x1 =
            _mm512_xor_si512(_mm512_loadu_si512(a + i + 64), _mm512_loadu_si512(b + i + 64));
        acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(x0));
        acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(x1));
    }
    for (; i + 64 <= n; i += 64) {
        __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i));
        acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(x0));
    }
    c = (int64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1));
    return c + hamming_bytes(a + i, b + i, n - i); /* < 64 bytes left */
}
#endif

typedef int64_t (*kernel_fn)(const unsigned char *, const unsigned char *, Py_ssize_t);
static kernel_fn kernel = hamming_bytes;
static const char *kernel_name = "scalar";

/* 'B' possibly with a native/standard byte-order prefix: unsigned char elements. */
static int is_u8_format(const char *fmt)
{
    if (fmt == NULL) {
        return 1; /* PyBUF_FORMAT not honoured: the exporter means unsigned bytes */
    }
    if (fmt[0] == '@' || fmt[0] == '=' || fmt[0] == '<' || fmt[0] == '>' || fmt[0] == '!') {
        fmt++;
    }
    return fmt[0] == 'B' && fmt[1] == '\0';
}

static int is_i64_format(const Py_buffer *v)
{
    const char *fmt = v->format;
    if (fmt == NULL || v->itemsize != 8) {
        return 0;
    }
    if (fmt[0] == '@' || fmt[0] == '=') {
        fmt++;
    } else if (fmt[0] == '<' || fmt[0] == '>' || fmt[0] == '!') {
        /* explicit byte order: only accept the native one */
        const uint16_t probe = 1;
        const int little = *(const unsigned char *)&probe == 1;
        if ((fmt[0] == '<') != little) {
            return 0;
        }
        fmt++;
    }
    return (fmt[0] == 'l' || fmt[0] == 'q') && fmt[1] == '\0';
}

/* Get a C-contiguous uint8 buffer of the given dimensionality; set an exception on failure. */
static int get_u8(PyObject *obj, Py_buffer *view, int ndim, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return -1;
    }
    if (!is_u8_format(view->format) || view->itemsize != 1) {
        PyErr_Format(PyExc_TypeError, "%s: expected uint8 elements (format 'B'), got '%s'", name,
                     view->format ? view->format : "?");
        PyBuffer_Release(view);
        return -1;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimension(s), got %d", name, ndim,
                     view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(hamming_doc,
             "hamming(a, b) -> int\n\n"
             "Differing bits between two C-contiguous 1-D uint8 buffers of equal length.");

static PyObject *py_hamming(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer va, vb;
    int64_t d;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "hamming() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_u8(args[0], &va, 1, "a") < 0) {
        return NULL;
    }
    if (get_u8(args[1], &vb, 1, "b") < 0) {
        PyBuffer_Release(&va);
        return NULL;
    }
    if (va.len != vb.len) {
        PyErr_Format(PyExc_ValueError, "hamming: signatures differ in length (%zd vs %zd bytes)",
                     va.len, vb.len);
        PyBuffer_Release(&va);
        PyBuffer_Release(&vb);
        return NULL;
    }
    d = kernel((const unsigned char *)va.buf, (const unsigned char *)vb.buf, va.len);
    PyBuffer_Release(&va);
    PyBuffer_Release(&vb);
    return PyLong_FromLongLong((long long)d);
}

PyDoc_STRVAR(one_to_many_doc,
             "one_to_many(a, B, out) -> None\n\n"
             "out[i] = differing bits between a (1-D uint8, n bytes) and row i of B (C-contiguous\n"
             "(m, n) uint8); out is a writable C-contiguous int64 buffer of length m.\n"
             "The GIL is released while large inputs are processed.");

static PyObject *py_one_to_many(PyObject *Py_UNUSED(module), PyObject *const *args,
                                Py_ssize_t nargs)
{
    Py_buffer va, vb, vo;
    Py_ssize_t m, n, i;
    const unsigned char *pa, *pb;
    int64_t *po;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "one_to_many() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_u8(args[0], &va, 1, "a") < 0) {
        return NULL;
    }
    if (get_u8(args[1], &vb, 2, "B") < 0) {
        PyBuffer_Release(&va);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &vo, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&va);
        PyBuffer_Release(&vb);
        return NULL;
    }
    m = vb.shape[0];
    n = vb.shape[1];
    if (!is_i64_format(&vo) || vo.ndim != 1) {
        PyErr_SetString(PyExc_TypeError, "out: expected a 1-D native int64 buffer");
        goto fail;
    }
    if (va.len != n) {
        PyErr_Format(PyExc_ValueError, "B has rows of %zd bytes but a has %zd bytes", n, va.len);
        goto fail;
    }
    if (vo.shape[0] != m) {
        PyErr_Format(PyExc_ValueError, "out has %zd entries but B has %zd rows", vo.shape[0], m);
        goto fail;
    }
    pa = (const unsigned char *)va.buf;
    pb = (const unsigned char *)vb.buf;
    po = (int64_t *)vo.buf;
    if (vb.len >= NOGIL_MIN_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        for (i = 0; i < m; i++) {
            po[i] = kernel(pa, pb + i * n, n);
        }
        Py_END_ALLOW_THREADS
    } else {
        for (i = 0; i < m; i++) {
            po[i] = kernel(pa, pb + i * n, n);
        }
    }
    PyBuffer_Release(&va);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&vo);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&va);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&vo);
    return NULL;
}

static int avx512_usable(void)
{
#if defined(REV_AVX512_POPCNT)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
    return 0;
#endif
}

PyDoc_STRVAR(select_doc,
             "_select(name) -> str\n\n"
             "Choose the kernel: 'auto' (the fastest this CPU runs), 'scalar' or 'avx512'.\n"
             "For tests and benchmarks; returns the kernel now in use.");

static PyObject *py_select(PyObject *module, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) {
        return NULL;
    }
    if (strcmp(name, "scalar") == 0 || (strcmp(name, "auto") == 0 && !avx512_usable())) {
        kernel = hamming_bytes;
        kernel_name = "scalar";
    } else if (strcmp(name, "avx512") == 0 || strcmp(name, "auto") == 0) {
#if defined(REV_AVX512_POPCNT)
        if (!avx512_usable()) {
            PyErr_SetString(PyExc_ValueError, "this CPU lacks AVX-512 VPOPCNTDQ");
            return NULL;
        }
        kernel = hamming_bytes_avx512;
        kernel_name = "avx512";
#else
        PyErr_SetString(PyExc_ValueError, "built without the AVX-512 kernel");
        return NULL;
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "unknown kernel %R", arg);
        return NULL;
    }
    {
        PyObject *value = PyUnicode_FromString(kernel_name);
        if (value == NULL || PyObject_SetAttrString(module, "KERNEL", value) < 0) {
            Py_XDECREF(value);
            return NULL;
        }
        return value; /* the new reference becomes the return value */
    }
}

static PyMethodDef methods[] = {
    {"hamming", (PyCFunction)(void (*)(void))py_hamming, METH_FASTCALL, hamming_doc},
    {"one_to_many", (PyCFunction)(void (*)(void))py_one_to_many, METH_FASTCALL, one_to_many_doc},
    {"_select", py_select, METH_O, select_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "rev_tasks.core._popcount",
    "Popcount kernels for packed-bit signatures (see rev_tasks.core.hamming).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__popcount(void)
{
#if defined(__POPCNT__)
    const long hw_popcnt = 1; /* built with -mpopcnt: one POPCNT instruction per word */
#else
    const long hw_popcnt = 0; /* portable build: the compiler's bit-twiddling popcount */
#endif
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) {
        return NULL;
    }
    if (avx512_usable()) {
#if defined(REV_AVX512_POPCNT)
        kernel = hamming_bytes_avx512;
        kernel_name = "avx512";
#endif
    }
    if (PyModule_AddIntConstant(mod, "HW_POPCNT", hw_popcnt) < 0 ||
        PyModule_AddStringConstant(mod, "KERNEL", kernel_name) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
