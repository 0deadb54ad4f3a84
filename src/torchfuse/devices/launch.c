/* torchfuse's native launcher: the per-call work between Python and a compiled kernel, in C.
 *
 * Built at run time by devices/launcher.py (the system C compiler, Python's headers), once per
 * machine and Python version, and kept in the on-disk cache. Without it the backends pack and
 * launch in Python; this saves the ctypes call and the argument packing (a few µs per call).
 *
 * Every call packs one int64 argument block: numel, the ints of each list given, then the
 * data pointer of each tensor (or the int given in its place); a CUDA launch also picks the
 * kernel's entry point and grid from the pointers. ``Call`` (made by ``prepare_cpu`` and
 * ``prepare_cuda``) is a kernel bound to one plan: its constants packed once, its outputs
 * allocated here; the executor's hot path is then one guard check and one call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define MAX_ARGS 1024

static PyObject *data_ptr_name;

/* Append n values to buf; 0 on success, -1 with a Python error set. Each is an int, or, where
 * ``pointers`` is set, may be a tensor: then its data_ptr() is appended. */
static int pack_items(int64_t *buf, Py_ssize_t *pos, PyObject *const *items, Py_ssize_t n,
                      int pointers) {
    if (*pos + n > MAX_ARGS) {
        PyErr_SetString(PyExc_ValueError, "too many kernel arguments");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = pointers && !PyLong_CheckExact(items[i])
                              ? PyObject_CallMethodNoArgs(items[i], data_ptr_name)
                              : Py_NewRef(items[i]);
        if (!value) return -1;
        buf[(*pos)++] = PyLong_AsLongLong(value);
        Py_DECREF(value);
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* pack_items of a list or tuple. */
static int pack(int64_t *buf, Py_ssize_t *pos, PyObject *seq, int pointers) {
    PyObject *fast = PySequence_Fast(seq, "expected a list of ints or tensors");
    if (!fast) return -1;
    int status = pack_items(buf, pos, PySequence_Fast_ITEMS(fast), PySequence_Fast_GET_SIZE(fast),
                            pointers);
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

/* cuLaunchKernelEx's signature and types (CUDA 11.8+), declared here so that no CUDA header is
 * needed: a launch config with at most one attribute, programmatic stream serialisation (PDL),
 * which lets the kernel start while the one before it in the stream finishes; the kernel
 * itself waits for that one's end before its first load (codegen/cuda's TF_GRID_DEPENDENCY).
 * ``pdl``: the vector entry waits so (scalar entries never do). */
typedef struct {
    int id;    /* CUlaunchAttributeID */
    int pad;
    union { char bytes[64]; int allowed; void *align; } value;
} cu_launch_attribute;
typedef struct {
    unsigned gx, gy, gz, bx, by, bz, shared;
    void *stream;
    cu_launch_attribute *attributes;
    unsigned n_attributes;
} cu_launch_config;
typedef int (*cu_launch_kernel)(const cu_launch_config *config, void *f, void **params,
                                void **extra);
#define CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION 6

/* Launch the vector entry (``width`` elements a thread) where there is one and every pointer
 * in buf[first:pos] is 16-byte aligned, else the scalar entry: a thread per element or vector,
 * blocks of ``block``, at most 2**31 - 1 of them. The GIL is released around the launch. */
static int launch_picked(void *launch, int pdl, void *scalar, void *vector, long long width,
                         long long block, void *stream, long long numel, int64_t *buf,
                         Py_ssize_t first, Py_ssize_t pos) {
    void *params[MAX_ARGS];
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
    cu_launch_attribute attribute = {CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 0,
                                     {{0}}};
    attribute.value.allowed = 1;
    cu_launch_config config = {(unsigned)blocks, 1, 1, (unsigned)block, 1, 1, 0, stream,
                               &attribute, pdl && function == vector ? 1 : 0};
    Py_BEGIN_ALLOW_THREADS
    result = ((cu_launch_kernel)launch)(&config, function, params, NULL);
    Py_END_ALLOW_THREADS
    return result;
}

/* cuda_pick(cuLaunchKernelEx, pdl, scalar, vector, width, block, stream, numel, sizes,
 *           dividers, strides, tensors) -> CUresult: a CUDA kernel's launch: its vector entry
 * (``vector``; 0 until it is built, or where the layout does not allow it), ``width`` elements
 * a thread, where every pointer is 16-byte aligned, else its scalar entry; a thread per element
 * or vector (blocks of ``block``, at most 2**31 - 1 of them). The whole of the CUDA quick path
 * but its memo of layouts; the general path passes the one entry it chose. */
static PyObject *cuda_pick(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t buf[MAX_ARGS];
    Py_ssize_t pos = 0;
    void *launch, *scalar, *vector, *stream;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "cuda_pick(cuLaunchKernelEx, pdl, scalar, vector, width, "
                                         "block, stream, numel, sizes, dividers, strides, tensors)");
        return NULL;
    }
    if (as_address(args[0], &launch) < 0 || as_address(args[2], &scalar) < 0 ||
        as_address(args[3], &vector) < 0 || as_address(args[6], &stream) < 0)
        return NULL;
    int pdl = PyObject_IsTrue(args[1]);
    long long width = PyLong_AsLongLong(args[4]);
    long long block = PyLong_AsLongLong(args[5]);
    long long numel = PyLong_AsLongLong(args[7]);
    if (pdl < 0 || PyErr_Occurred()) return NULL;
    if (width < 1 || block < 1 || numel < 0) {
        PyErr_SetString(PyExc_ValueError, "width and block must be positive, numel not negative");
        return NULL;
    }
    buf[pos++] = numel;
    if (pack(buf, &pos, args[8], 0) < 0 || pack(buf, &pos, args[9], 0) < 0 ||
        pack(buf, &pos, args[10], 0) < 0)
        return NULL;
    Py_ssize_t first = pos;
    if (pack(buf, &pos, args[11], 1) < 0) return NULL;
    if (numel == 0) return PyLong_FromLong(0);
    return PyLong_FromLong(launch_picked(launch, pdl, scalar, vector, width, block, stream, numel,
                                         buf, first, pos));
}

/* ---- Call: a kernel bound to one plan ------------------------------------------------------ */

typedef int (*cu_ctx_get_current)(void **context);

/* call(*operands) -> the outputs' tuple; an int: the kernel's error code, or cuLaunchKernelEx's
 * CUresult (the caller's general path then runs, and reports it); None where a CUDA launch
 * cannot go from this thread as it stands (no context, or another GPU's): the general path
 * switches device and runs. An operand is a tensor, or an int: its data pointer. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    void *kernel;              /* the C kernel, or the CUDA scalar entry */
    void *vector;              /* the CUDA vector entry, or NULL */
    cu_launch_kernel launch;   /* NULL for a C kernel */
    int pdl;                   /* launch it with programmatic stream serialisation */
    cu_ctx_get_current current;
    void *context;             /* the CUDA context current when the call was prepared */
    long long width, block, numel;
    PyObject *stream, *index;  /* stream(index): torch's current raw stream on the GPU */
    PyObject *empty, *outs;    /* empty(shape, strides, dtype) for each such triple in outs */
    PyObject *owner;           /* keeps the kernel's code loaded */
    Py_ssize_t n_operands, n_consts;
    int64_t *consts;           /* numel, sizes, (dividers,) strides */
} Call;

static PyObject *call_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    Call *self = (Call *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames || nargs != self->n_operands) {
        PyErr_Format(PyExc_TypeError, "the kernel takes %zd operands, %zd given",
                     self->n_operands, nargs);
        return NULL;
    }
    if (self->launch) {
        void *context = NULL;
        if (self->current(&context) != 0 || context != self->context) Py_RETURN_NONE;
    }
    int64_t buf[MAX_ARGS];
    Py_ssize_t pos = self->n_consts, first = pos;
    memcpy(buf, self->consts, pos * sizeof(int64_t));
    if (pack_items(buf, &pos, args, nargs, 1) < 0) return NULL;
    Py_ssize_t n_out = PyTuple_GET_SIZE(self->outs);
    PyObject *outputs = PyTuple_New(n_out);
    if (!outputs) return NULL;
    for (Py_ssize_t i = 0; i < n_out; i++) {
        PyObject *out = PyTuple_GET_ITEM(self->outs, i);  /* (shape, strides, dtype) */
        PyObject *tensor = PyObject_Vectorcall(self->empty, &PyTuple_GET_ITEM(out, 0), 3, NULL);
        if (!tensor) goto fail;
        PyTuple_SET_ITEM(outputs, i, tensor);
    }
    if (pack_items(buf, &pos, &PyTuple_GET_ITEM(outputs, 0), n_out, 1) < 0) goto fail;
    if (self->numel == 0) return outputs;
    int error;
    if (self->launch) {
        PyObject *stream = PyObject_CallOneArg(self->stream, self->index);
        if (!stream) goto fail;
        void *raw = PyLong_AsVoidPtr(stream);
        Py_DECREF(stream);
        if (PyErr_Occurred()) goto fail;
        error = launch_picked(self->launch, self->pdl, self->kernel, self->vector, self->width,
                              self->block, raw, self->numel, buf, first, pos);
    } else {
        Py_BEGIN_ALLOW_THREADS
        error = ((cpu_kernel)self->kernel)(buf);
        Py_END_ALLOW_THREADS
    }
    if (error == 0) return outputs;
    Py_DECREF(outputs);
    return PyLong_FromLong(error);
fail:
    Py_DECREF(outputs);
    return NULL;
}

static void call_dealloc(PyObject *object) {
    Call *self = (Call *)object;
    Py_XDECREF(self->stream);
    Py_XDECREF(self->index);
    Py_XDECREF(self->empty);
    Py_XDECREF(self->outs);
    Py_XDECREF(self->owner);
    PyMem_Free(self->consts);
    Py_TYPE(object)->tp_free(object);
}

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torchfuse_launch.Call",
    .tp_doc = "A kernel bound to one plan: call(*operands) -> outputs (see launch.c).",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Call, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = call_dealloc,
};

/* A Call with its constants and outputs checked; its kernel fields are the caller's to set. */
static Call *new_call(PyObject *consts, PyObject *n_operands, PyObject *empty, PyObject *outs,
                      PyObject *owner) {
    int64_t buf[MAX_ARGS];
    Py_ssize_t n = 0;
    if (pack(buf, &n, consts, 0) < 0) return NULL;
    if (n < 1 || buf[0] < 0) {
        PyErr_SetString(PyExc_ValueError, "the constants start with numel, not negative");
        return NULL;
    }
    if (!PyTuple_Check(outs)) {
        PyErr_SetString(PyExc_TypeError, "outs must be a tuple of (shape, strides, dtype)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(outs); i++) {
        PyObject *out = PyTuple_GET_ITEM(outs, i);
        if (!PyTuple_Check(out) || PyTuple_GET_SIZE(out) != 3) {
            PyErr_SetString(PyExc_TypeError, "outs must be a tuple of (shape, strides, dtype)");
            return NULL;
        }
    }
    Py_ssize_t operands = PyLong_AsSsize_t(n_operands);
    if (operands == -1 && PyErr_Occurred()) return NULL;
    if (operands < 0 || n + operands + PyTuple_GET_SIZE(outs) > MAX_ARGS) {
        PyErr_SetString(PyExc_ValueError, "too many kernel arguments");
        return NULL;
    }
    Call *self = PyObject_New(Call, &CallType);
    if (!self) return NULL;
    self->vectorcall = call_vectorcall;
    self->kernel = self->vector = self->context = NULL;
    self->launch = NULL;
    self->pdl = 0;
    self->current = NULL;
    self->width = self->block = 1;
    self->numel = buf[0];
    self->stream = self->index = NULL;
    self->empty = Py_NewRef(empty);
    self->outs = Py_NewRef(outs);
    self->owner = Py_NewRef(owner);
    self->n_operands = operands;
    self->n_consts = n;
    self->consts = PyMem_Malloc(n * sizeof(int64_t));
    if (!self->consts) {
        Py_DECREF(self);
        return (Call *)PyErr_NoMemory();
    }
    memcpy(self->consts, buf, n * sizeof(int64_t));
    return self;
}

/* prepare_cpu(kernel, consts, n_operands, empty, outs, owner) -> Call of a C kernel. */
static PyObject *prepare_cpu(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "prepare_cpu(kernel, consts, n_operands, empty, outs, owner)");
        return NULL;
    }
    void *kernel;
    if (as_address(args[0], &kernel) < 0) return NULL;
    Call *self = new_call(args[1], args[2], args[3], args[4], args[5]);
    if (self) self->kernel = kernel;
    return (PyObject *)self;
}

/* prepare_cuda(cuLaunchKernelEx, pdl, cuCtxGetCurrent, scalar, vector, width, block, stream,
 *              index, consts, n_operands, empty, outs, owner) -> Call of a CUDA kernel, bound
 * to the context current now: the caller makes its GPU's current first. */
static PyObject *prepare_cuda(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError,
                        "prepare_cuda(cuLaunchKernelEx, pdl, cuCtxGetCurrent, scalar, vector, "
                        "width, block, stream, index, consts, n_operands, empty, outs, owner)");
        return NULL;
    }
    void *launch, *current, *scalar, *vector, *context = NULL;
    if (as_address(args[0], &launch) < 0 || as_address(args[2], &current) < 0 ||
        as_address(args[3], &scalar) < 0 || as_address(args[4], &vector) < 0)
        return NULL;
    int pdl = PyObject_IsTrue(args[1]);
    long long width = PyLong_AsLongLong(args[5]);
    long long block = PyLong_AsLongLong(args[6]);
    if (pdl < 0 || PyErr_Occurred()) return NULL;
    if (width < 1 || block < 1 || !launch || !current || !scalar) {
        PyErr_SetString(PyExc_ValueError, "a CUDA call needs its functions, width and block");
        return NULL;
    }
    int result = ((cu_ctx_get_current)current)(&context);
    if (result != 0 || !context) {
        PyErr_Format(PyExc_RuntimeError, "no current CUDA context (CUresult %d)", result);
        return NULL;
    }
    Call *self = new_call(args[9], args[10], args[11], args[12], args[13]);
    if (!self) return NULL;
    self->launch = (cu_launch_kernel)launch;
    self->pdl = pdl;
    self->current = (cu_ctx_get_current)current;
    self->context = context;
    self->kernel = scalar;
    self->vector = vector;
    self->width = width;
    self->block = block;
    self->stream = Py_NewRef(args[7]);
    self->index = Py_NewRef(args[8]);
    return (PyObject *)self;
}

static PyMethodDef methods[] = {
    {"cpu", (PyCFunction)(void (*)(void))cpu, METH_FASTCALL, "Call a generated C kernel."},
    {"cuda_pick", (PyCFunction)(void (*)(void))cuda_pick, METH_FASTCALL,
     "Launch a CUDA kernel: its vector entry where the pointers allow, else its scalar one."},
    {"prepare_cpu", (PyCFunction)(void (*)(void))prepare_cpu, METH_FASTCALL,
     "A C kernel bound to one plan's constants and outputs."},
    {"prepare_cuda", (PyCFunction)(void (*)(void))prepare_cuda, METH_FASTCALL,
     "A CUDA kernel bound to one plan's constants and outputs, and to the current context."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "torchfuse_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit_torchfuse_launch(void) {
    data_ptr_name = PyUnicode_InternFromString("data_ptr");
    if (!data_ptr_name || PyType_Ready(&CallType) < 0) return NULL;
    return PyModule_Create(&module);
}
