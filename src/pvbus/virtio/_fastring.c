/*
 * pvbus.virtio._fastring: the split virtqueue's hot loop in C (VIRTIO 1.2 section 2.7).
 *
 * Two functions, both optional accelerators of pure-Python code in pvbus/virtio/split.py that
 * has the same semantics (and is what runs where this module is not built):
 *
 *   pop_frames(desc, avail, size, next_avail, limit, want, regions,
 *              skip, min_len, max_len, zero_prefix[, copy]) -> (views, heads, next_avail)
 *       Take available chains while each is ONE descriptor whose flags equal `want` (no
 *       NEXT, no INDIRECT), whose length is in [min_len, max_len], that lies in one guest
 *       memory region and whose first `zero_prefix` bytes are zero. Stop at the first chain
 *       that is anything else and leave it available: the Python code walks it and reports
 *       what is wrong with it. `views` are memoryviews of each buffer past its first `skip`
 *       bytes (slices of the region's memoryview, so they keep the mapping alive), or with
 *       `copy` bytes objects holding a copy (for a backend that keeps frames after their
 *       chains are returned); `heads` is the chains' head indices as native uint16s.
 *
 *   fill_frames(desc, avail, used, size, next_avail, next_used, regions, frames, prefix)
 *       -> (count, next_avail, next_used)
 *       Copy `prefix` + frame into the next available chain for each frame of the list
 *       `frames`, in order, while that chain is ONE device-writable descriptor (no NEXT, no
 *       INDIRECT) in one region with room for it; then publish the used elements (id, bytes
 *       written) and the used index once. The first frame that does not fit so stops it and
 *       its chain stays available.
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

/* Hold the buffers of `regions_obj` ((gpa, size, memoryview) tuples) in regions/held. */
static int
hold_regions(PyObject *regions_obj, region_t *regions, held_buffer *held, Py_ssize_t *count)
{
    *count = 0;
    if (!PyTuple_Check(regions_obj) || PyTuple_GET_SIZE(regions_obj) > MAX_REGIONS) {
        PyErr_SetString(PyExc_TypeError, "regions must be a tuple of (gpa, size, memoryview)");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(regions_obj);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *entry = PyTuple_GET_ITEM(regions_obj, r);
        unsigned long long gpa, rsize;
        PyObject *buf;
        if (!PyArg_ParseTuple(entry, "KKO", &gpa, &rsize, &buf))
            return -1;
        if (get_buffer(buf, &held[r].view, (Py_ssize_t)rsize, 1, "guest memory region") < 0)
            return -1;
        *count = r + 1;
        regions[r].gpa = gpa;
        regions[r].size = rsize;
        regions[r].base = held[r].view.buf;
        regions[r].buf = buf;
    }
    return 0;
}

static void
release_regions(held_buffer *held, Py_ssize_t count)
{
    for (Py_ssize_t r = 0; r < count; r++)
        PyBuffer_Release(&held[r].view);
}

/* The region holding [addr, addr + len), trying *last first; NULL if none. */
static region_t *
find_region(region_t *regions, Py_ssize_t n, Py_ssize_t *last, uint64_t addr, uint64_t len)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = (*last + k) % n;
        region_t *c = &regions[i];
        if (addr >= c->gpa && addr - c->gpa <= c->size && len <= c->size - (addr - c->gpa)) {
            *last = i;
            return c;
        }
    }
    return NULL;
}

/* Descriptor `head` of the table, copied once (the guest may change it meanwhile). */
static void
read_desc(const unsigned char *table, uint16_t head, uint64_t *addr, uint32_t *len,
          uint16_t *flags)
{
    unsigned char d[16];
    memcpy(d, table + 16 * (size_t)head, 16);
    memcpy(addr, d, 8);
    memcpy(len, d + 8, 4);
    memcpy(flags, d + 12, 2);
}

/* The chain head in available slot `slot` and its descriptor; 0 if the head is out of range. */
static int
slot_desc(const unsigned char *ring, const unsigned char *table, unsigned int size,
          unsigned int slot, uint16_t *head, uint64_t *addr, uint32_t *len, uint16_t *flags)
{
    memcpy(head, ring + 4 + 2 * (slot % size), 2);
    if (*head >= size)
        return 0;
    read_desc(table, *head, addr, len, flags);
    return 1;
}

/* Entries available past next_avail (0 for an index more than a queue ahead). */
static unsigned int
available(const unsigned char *ring, unsigned int size, unsigned int next_avail)
{
    uint16_t avail_idx;
    memcpy(&avail_idx, ring + 2, 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the index before the entries it covers */
    unsigned int n = (uint16_t)(avail_idx - next_avail);
    return n > size ? 0 : n; /* a bad index: the Python side raises the error */
}

static PyObject *
pop_frames(PyObject *self, PyObject *args)
{
    PyObject *desc_obj, *avail_obj, *regions_obj;
    unsigned int size, next_avail, limit, want, skip, zero_prefix;
    unsigned long long min_len, max_len;
    int copy = 0;
    if (!PyArg_ParseTuple(args, "OOIIIIOIKKI|p", &desc_obj, &avail_obj, &size, &next_avail,
                          &limit, &want, &regions_obj, &skip, &min_len, &max_len, &zero_prefix,
                          &copy))
        return NULL;
    if (size == 0 || size > 32768 || next_avail > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "queue size or index out of range");
        return NULL;
    }
    if (min_len < (unsigned long long)skip + zero_prefix)
        min_len = (unsigned long long)skip + zero_prefix; /* the view and the check need them */

    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0, count = 0, last = 0;
    Py_buffer desc, avail;
    PyObject *views = NULL, *heads = NULL, *result = NULL;
    uint16_t *head_out;

    if (get_buffer(desc_obj, &desc, (Py_ssize_t)16 * size, 0, "descriptor table") < 0)
        return NULL;
    if (get_buffer(avail_obj, &avail, 4 + (Py_ssize_t)2 * size, 0, "available ring") < 0) {
        PyBuffer_Release(&desc);
        return NULL;
    }
    if (hold_regions(regions_obj, regions, held, &nregions) < 0)
        goto out;

    const unsigned char *ring = avail.buf;
    unsigned int n = available(ring, size, next_avail);
    if (n > limit)
        n = limit;
    views = PyList_New(0);
    heads = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)2 * n);
    if (views == NULL || heads == NULL)
        goto out;
    head_out = (uint16_t *)PyBytes_AS_STRING(heads);
    for (unsigned int i = 0; i < n; i++) {
        uint16_t head, flags;
        uint64_t addr;
        uint32_t len;
        if (!slot_desc(ring, desc.buf, size, next_avail + i, &head, &addr, &len, &flags))
            break;
        if (flags != want || len < min_len || len > max_len)
            break;
        region_t *reg = find_region(regions, nregions, &last, addr, len);
        if (reg == NULL)
            break;
        uint64_t off = addr - reg->gpa;
        const unsigned char *p = (const unsigned char *)reg->base + off;
        unsigned int z;
        for (z = 0; z < zero_prefix && p[z] == 0; z++)
            ;
        if (z < zero_prefix)
            break;
        PyObject *view =
            copy ? PyBytes_FromStringAndSize((const char *)p + skip, (Py_ssize_t)(len - skip))
                 : PySequence_GetSlice(reg->buf, (Py_ssize_t)(off + skip), (Py_ssize_t)(off + len));
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
    release_regions(held, nregions);
    PyBuffer_Release(&avail);
    PyBuffer_Release(&desc);
    return result;
}

/* Used element (id, len) at position idx of the used ring. */
static void
put_used(unsigned char *ring, unsigned int size, uint16_t idx, uint32_t id, uint32_t len)
{
    uint32_t elem[2] = {id, len};
    memcpy(ring + 4 + 8 * (size_t)(idx % size), elem, 8);
}

/* The used index, after the elements it covers (section 2.7.8). */
static void
publish_index(unsigned char *ring, uint16_t idx)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(ring + 2, &idx, 2);
}

static PyObject *
fill_frames(PyObject *self, PyObject *args)
{
    PyObject *desc_obj, *avail_obj, *used_obj, *regions_obj, *frames;
    unsigned int size, next_avail, next_used;
    Py_buffer prefix;
    if (!PyArg_ParseTuple(args, "OOOIIIOO!y*", &desc_obj, &avail_obj, &used_obj, &size,
                          &next_avail, &next_used, &regions_obj, &PyList_Type, &frames,
                          &prefix))
        return NULL;
    if (size == 0 || size > 32768 || next_avail > 0xFFFF || next_used > 0xFFFF) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "queue size or index out of range");
        return NULL;
    }
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0, count = 0, last = 0;
    Py_buffer desc, avail, used;
    PyObject *result = NULL;
    int have_desc = 0, have_avail = 0, have_used = 0;

    if (get_buffer(desc_obj, &desc, (Py_ssize_t)16 * size, 0, "descriptor table") < 0)
        goto out;
    have_desc = 1;
    if (get_buffer(avail_obj, &avail, 4 + (Py_ssize_t)2 * size, 0, "available ring") < 0)
        goto out;
    have_avail = 1;
    if (get_buffer(used_obj, &used, 4 + (Py_ssize_t)8 * size, 1, "used ring") < 0)
        goto out;
    have_used = 1;
    if (hold_regions(regions_obj, regions, held, &nregions) < 0)
        goto out;

    const unsigned char *ring = avail.buf;
    Py_ssize_t n = available(ring, size, next_avail);
    if (n > PyList_GET_SIZE(frames))
        n = PyList_GET_SIZE(frames);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t head, flags;
        uint64_t addr;
        uint32_t len;
        if (!slot_desc(ring, desc.buf, size, next_avail + (unsigned int)i, &head, &addr, &len,
                       &flags))
            break;
        if (flags != 2 /* VIRTQ_DESC_F_WRITE alone */)
            break;
        Py_buffer frame;
        if (PyObject_GetBuffer(PyList_GET_ITEM(frames, i), &frame, PyBUF_SIMPLE) < 0)
            goto out;
        uint64_t need = (uint64_t)prefix.len + (uint64_t)frame.len;
        region_t *reg = need <= len ? find_region(regions, nregions, &last, addr, need) : NULL;
        if (reg == NULL) {
            PyBuffer_Release(&frame);
            break;
        }
        char *p = reg->base + (addr - reg->gpa);
        memcpy(p, prefix.buf, prefix.len);
        memcpy(p + prefix.len, frame.buf, frame.len);
        PyBuffer_Release(&frame);
        put_used(used.buf, size, (uint16_t)(next_used + count), head, (uint32_t)need);
        count++;
    }
    if (count) {
        next_used = (next_used + count) & 0xFFFF;
        publish_index(used.buf, (uint16_t)next_used);
    }
    result = Py_BuildValue("(nII)", count, (unsigned int)((next_avail + count) & 0xFFFF),
                           next_used);
out:
    release_regions(held, nregions);
    if (have_used)
        PyBuffer_Release(&used);
    if (have_avail)
        PyBuffer_Release(&avail);
    if (have_desc)
        PyBuffer_Release(&desc);
    PyBuffer_Release(&prefix);
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
    for (Py_ssize_t i = 0; i < count; i++)
        put_used(ring, size, idx++, h[i], length);
    publish_index(ring, idx);
    PyBuffer_Release(&used);
    PyBuffer_Release(&heads);
    return PyLong_FromUnsignedLong(idx);
}

static PyMethodDef methods[] = {
    {"pop_frames", pop_frames, METH_VARARGS,
     "Take available one-descriptor chains as memoryviews (see the module source)."},
    {"fill_frames", fill_frames, METH_VARARGS,
     "Copy frames into available one-buffer writable chains; publish them (see the source)."},
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
