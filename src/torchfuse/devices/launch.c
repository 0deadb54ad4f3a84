/* torchfuse's native launcher: the per-call work between Python and a compiled kernel, in C.
 *
 * Built at run time by devices/launcher.py (the system C compiler, Python's headers), once per
 * machine and Python version, and kept in the on-disk cache. Without it the backends pack and
 * launch in Python; this saves the ctypes call and the argument packing (a few µs per call).
 *
 * Both entry points pack one int64 argument block: numel, the ints of each list given, then the
 * data pointer of each tensor (or the int given in its place); cuda_pick also picks the CUDA
 * kernel's entry point and grid from the pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_ARGS 1024

static PyObject *data_ptr_name;

/* Append the values of a list or tuple; 0 on success, -1 with a Python error set. Each is an
 * int, or, where ``pointers`` is set, may be a tensor: then its data_ptr() is appended. */
static int pack(int64_t *buf, Py_ssize_t *pos, PyObject *seq, int pointers) {
    PyObject *fast = PySequence_Fast(seq, "expected a list of ints or tensors");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    int status = 0;
    if (*pos + n > MAX_ARGS) {
        PyErr_SetString(PyExc_ValueError, "too many kernel arguments");
        status = -1;
    }
    for (Py_ssize_t i = 0; i < n && status == 0; i++) {
        PyObject *value = pointers && !PyLong_CheckExact(items[i])
                              ? PyObject_CallMethodNoArgs(items[i], data_ptr_name)
                              : Py_NewRef(items[i]);
        if (!value) {
            status = -1;
            break;
        }
        buf[(*pos)++] = PyLong_AsLongLong(value);
        Py_DECREF(value);
        if (PyErr_Occurred()) status = -1;
    }
    Py_DECREF(fast);
    return status;
}

static int as_address(PyObject *value, void **out) {
    *out = PyLong_AsVoidPtr(value);
    return *out == NULL && PyErr_Occurred() ? -1 : 0;
}

typedef int (*cpu_kernel)(const int64_t *);

/* cpu(kernel, numel, sizes, strides, tensors) -> error code of the kernel.
 * kernel: the address of a generated C kernel, int tf_kernel(const int64_t *args). */
static PyObject *cpu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t buf[MAX_ARGS];
    Py_ssize_t pos = 0;
    void *kernel;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "cpu(kernel, numel, sizes, strides, tensors)");
        return NULL;
    }
    if (as_address(args[0], &kernel) < 0) return NULL;
    buf[pos++] = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (pack(buf, &pos, args[2], 0) < 0 || pack(buf, &pos, args[3], 0) < 0 ||
        pack(buf, &pos, args[4], 1) < 0)
        return NULL;
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = ((cpu_kernel)kernel)(buf);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(error);
}

/* cuLaunchKernel's signature, declared here so that no CUDA header is needed. */
typedef int (*cu_launch_kernel)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                unsigned by, unsigned bz, unsigned shared, void *stream,
                                void **params, void **extra);

/* cuda_pick(cuLaunchKernel, scalar, vector, width, block, stream, numel, sizes, dividers,
 *           strides, tensors) -> CUresult: a CUDA kernel's launch: its vector entry
 * (``vector``; 0 until it is built, or where the layout does not allow it), ``width`` elements
 * a thread, where every pointer is 16-byte aligned, else its scalar entry; a thread per element
 * or vector (blocks of ``block``, at most 2**31 - 1 of them). The whole of the CUDA quick path
 * but its memo of layouts; the general path passes the one entry it chose. */
static PyObject *cuda_pick(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t buf[MAX_ARGS];
    void *params[MAX_ARGS];
    Py_ssize_t pos = 0;
    void *launch, *scalar, *vector, *stream;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "cuda_pick(cuLaunchKernel, scalar, vector, width, block, "
                                         "stream, numel, sizes, dividers, strides, tensors)");
        return NULL;
    }
    if (as_address(args[0], &launch) < 0 || as_address(args[1], &scalar) < 0 ||
        as_address(args[2], &vector) < 0 || as_address(args[5], &stream) < 0)
        return NULL;
    long long width = PyLong_AsLongLong(args[3]);
    long long block = PyLong_AsLongLong(args[4]);
    long long numel = PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (width < 1 || block < 1 || numel < 0) {
        PyErr_SetString(PyExc_ValueError, "width and block must be positive, numel not negative");
        return NULL;
    }
    buf[pos++] = numel;
    if (pack(buf, &pos, args[7], 0) < 0 || pack(buf, &pos, args[8], 0) < 0 ||
        pack(buf, &pos, args[9], 0) < 0)
        return NULL;
    Py_ssize_t first = pos;
    if (pack(buf, &pos, args[10], 1) < 0) return NULL;
    if (numel == 0) return PyLong_FromLong(0);
    int64_t bits = 0;
    for (Py_ssize_t i = first; i < pos; i++) bits |= buf[i];
    void *function = scalar;
    long long work = numel;
    if (vector != NULL && !(bits & 15)) {
        function = vector;
        work = (numel + width - 1) / width;
    }
    long long blocks = (work + block - 1) / block;
    if (blocks > 2147483647LL) blocks = 2147483647LL;
    for (Py_ssize_t i = 0; i < pos; i++) params[i] = &buf[i];
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = ((cu_launch_kernel)launch)(function, (unsigned)blocks, 1, 1, (unsigned)block, 1, 1,
                                        0, stream, params, NULL);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

static PyMethodDef methods[] = {
    {"cpu", (PyCFunction)(void (*)(void))cpu, METH_FASTCALL, "Call a generated C kernel."},
    {"cuda_pick", (PyCFunction)(void (*)(void))cuda_pick, METH_FASTCALL,
     "Launch a CUDA kernel: its vector entry where the pointers allow, else its scalar one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "torchfuse_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit_torchfuse_launch(void) {
    data_ptr_name = PyUnicode_InternFromString("data_ptr");
    if (!data_ptr_name) return NULL;
    return PyModule_Create(&module);
}
