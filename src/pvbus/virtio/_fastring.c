/*
 * pvbus.virtio._fastring: the split virtqueue's hot loop in C (VIRTIO 1.2 section 2.7).
 *
 * Two functions, both optional accelerators of pure-Python code in pvbus/virtio/split.py that
 * has the same semantics (and is what runs where this module is not built):
 *
 *   pop_frames(desc, avail, size, next_avail, limit, want, regions,
 *              skip, min_len, max_len, zero_prefix) -> (views, heads, next_avail)
 *       Take available chains while each is ONE descriptor whose flags equal `want` (no
 *       NEXT, no INDIRECT), whose length is in [min_len, max_len], that lies in one guest
 *       memory region and whose first `zero_prefix` bytes are zero. Stop at the first chain
 *       that is anything else and leave it available: the Python code walks it and reports
 *       what is wrong with it. `views` are memoryviews of each buffer past its first `skip`
 *       bytes (slices of the region's memoryview, so they keep the mapping alive); `heads`
 *       is the chains' head indices as native uint16s.
 *
 *   publish_used(used, size, next_used, heads, length) -> next_used
 *       Write one used element (id = head, len = length) per head, then the used index,
 *       with a release fence between them (section 2.7.8).
 *
 * Guest memory is shared with a driver that may be hostile or buggy: every index is checked
 * against the queue size, every buffer against its region, and nothing is read twice in a
 * way that matters (each descriptor is copied out once before it is checked).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pvbus._fastring reads the little-endian virtio rings directly"
#endif

#define MAX_REGIONS 512

typedef struct {
    uint64_t gpa;
    uint64_t size;
    char *base;
    PyObject *buf; /* the region's memoryview (borrowed from the regions tuple) */
} region_t;

typedef struct {
    Py_buffer view;
    int held;
} held_buffer;

static int
get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t need, int writable, const char *what)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s is %zd bytes, needs %zd", what, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
pop_frames(PyObject *self, PyObject *args)
{
    PyObject *desc_obj, *avail_obj, *regions_obj;
    unsigned int size, next_avail, limit, want, skip, zero_prefix;
    unsigned long long min_len, max_len;
    if (!PyArg_ParseTuple(args, "OOIIIIOIKKI", &desc_obj, &avail_obj, &size, &next_avail,
                          &limit, &want, &regions_obj, &skip, &min_len, &max_len, &zero_prefix))
        return NULL;
    if (size == 0 || size > 32768 || next_avail > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "queue size or index out of range");
        return NULL;
    }
    if (!PyTuple_Check(regions_obj) || PyTuple_GET_SIZE(regions_obj) > MAX_REGIONS) {
        PyErr_SetString(PyExc_TypeError, "regions must be a tuple of (gpa, size, memoryview)");
        return NULL;
    }
    if (min_len < (unsigned long long)skip + zero_prefix)
        min_len = (unsigned long long)skip + zero_prefix; /* the view and the check need them */

    Py_ssize_t nregions = PyTuple_GET_SIZE(regions_obj);
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_buffer desc, avail;
    PyObject *views = NULL, *heads = NULL, *result = NULL;
    uint16_t *head_out;
    Py_ssize_t r, count = 0;

    if (get_buffer(desc_obj, &desc, (Py_ssize_t)16 * size, 0, "descriptor table") < 0)
        return NULL;
    if (get_buffer(avail_obj, &avail, 4 + (Py_ssize_t)2 * size, 0, "available ring") < 0) {
        PyBuffer_Release(&desc);
        return NULL;
    }
    for (r = 0; r < nregions; r++)
        held[r].held = 0;
    for (r = 0; r < nregions; r++) {
        PyObject *entry = PyTuple_GET_ITEM(regions_obj, r);
        unsigned long long gpa, rsize;
        PyObject *buf;
        if (!PyArg_ParseTuple(entry, "KKO", &gpa, &rsize, &buf))
            goto out;
        if (get_buffer(buf, &held[r].view, (Py_ssize_t)rsize, 1, "guest memory region") < 0)
            goto out;
        held[r].held = 1;
        regions[r].gpa = gpa;
        regions[r].size = rsize;
        regions[r].base = held[r].view.buf;
        regions[r].buf = buf;
    }

    const unsigned char *table = desc.buf;
    const unsigned char *ring = avail.buf;
    uint16_t avail_idx;
    memcpy(&avail_idx, ring + 2, 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the index before the entries it covers */
    unsigned int n = (uint16_t)(avail_idx - next_avail);
    if (n > size)
        n = 0; /* a bad index: the Python side raises the error */
    if (n > limit)
        n = limit;

    views = PyList_New(0);
    heads = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)2 * n);
    if (views == NULL || heads == NULL)
        goto out;
    head_out = (uint16_t *)PyBytes_AS_STRING(heads);
    Py_ssize_t last = 0;
    for (unsigned int i = 0; i < n; i++) {
        uint16_t head;
        memcpy(&head, ring + 4 + 2 * ((next_avail + i) % size), 2);
        if (head >= size)
            break;
        unsigned char d[16];
        memcpy(d, table + 16 * (size_t)head, 16); /* one copy: the guest may change it */
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        if (flags != want || len < min_len || len > max_len)
            break;
        /* The region holding [addr, addr + len): the last one used first. */
        region_t *reg = NULL;
        for (Py_ssize_t k = 0; k < nregions; k++) {
            region_t *c = &regions[(last + k) % nregions];
            if (addr >= c->gpa && addr - c->gpa <= c->size && len <= c->size - (addr - c->gpa)) {
                reg = c;
                last = (last + k) % nregions;
                break;
            }
        }
        if (reg == NULL)
            break;
        uint64_t off = addr - reg->gpa;
        const unsigned char *p = (const unsigned char *)reg->base + off;
        unsigned int z;
        for (z = 0; z < zero_prefix && p[z] == 0; z++)
            ;
        if (z < zero_prefix)
            break;
        PyObject *view = PySequence_GetSlice(reg->buf, (Py_ssize_t)(off + skip),
                                             (Py_ssize_t)(off + len));
        if (view == NULL)
            goto out;
        if (PyList_Append(views, view) < 0) {
            Py_DECREF(view);
            goto out;
        }
        Py_DECREF(view);
        head_out[count++] = head;
    }
    if (count < (Py_ssize_t)n && _PyBytes_Resize(&heads, (Py_ssize_t)2 * count) < 0) {
        heads = NULL;
        goto out;
    }
    result = Py_BuildValue("(OOI)", views, heads, (unsigned int)((next_avail + count) & 0xFFFF));
out:
    Py_XDECREF(views);
    Py_XDECREF(heads);
    for (r = 0; r < nregions; r++)
        if (held[r].held)
            PyBuffer_Release(&held[r].view);
    PyBuffer_Release(&avail);
    PyBuffer_Release(&desc);
    return result;
}

static PyObject *
publish_used(PyObject *self, PyObject *args)
{
    PyObject *used_obj;
    unsigned int size, next_used, length;
    Py_buffer heads, used;
    if (!PyArg_ParseTuple(args, "OIIy*I", &used_obj, &size, &next_used, &heads, &length))
        return NULL;
    if (size == 0 || size > 32768 || next_used > 0xFFFF || heads.len % 2) {
        PyBuffer_Release(&heads);
        PyErr_SetString(PyExc_ValueError, "queue size, index or heads out of range");
        return NULL;
    }
    if (get_buffer(used_obj, &used, 4 + (Py_ssize_t)8 * size, 1, "used ring") < 0) {
        PyBuffer_Release(&heads);
        return NULL;
    }
    unsigned char *ring = used.buf;
    const uint16_t *h = heads.buf;
    Py_ssize_t count = heads.len / 2;
    uint16_t idx = (uint16_t)next_used;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t elem[2] = {h[i], length};
        memcpy(ring + 4 + 8 * (size_t)(idx % size), elem, 8);
        idx++;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the entries before the index (2.7.8) */
    memcpy(ring + 2, &idx, 2);
    PyBuffer_Release(&used);
    PyBuffer_Release(&heads);
    return PyLong_FromUnsignedLong(idx);
}

static PyMethodDef methods[] = {
    {"pop_frames", pop_frames, METH_VARARGS,
     "Take available one-descriptor chains as memoryviews (see the module source)."},
    {"publish_used", publish_used, METH_VARARGS,
     "Write used elements for heads, then the used index; return the new index."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pvbus.virtio._fastring",
    .m_doc = "The split virtqueue's hot loop in C (optional; see pvbus.virtio.split).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fastring(void)
{
    return PyModule_Create(&module);
}
