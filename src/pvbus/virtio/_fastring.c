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
 *       bytes (slices of the region's memoryview, so they keep the mapping alive); `heads` is
 *       the chains' head indices as native uint16s.
 *
 *   pop_batch(desc, avail, size, next_avail, limit, want, regions,
 *             skip, min_len, max_len, zero_prefix, into) -> (ends, heads, next_avail)
 *       The same chains as pop_frames, as many as fit, copied frame after frame into the
 *       writable buffer `into`; `ends` holds each frame's end offset there as native
 *       uint32s (a "frame batch": no allocation per frame, for a consumer that keeps frames
 *       after their chains are returned and recycles its buffers). The chains past what
 *       fits stay available.
 *
 *   fill_batch(desc, avail, used, size, next_avail, next_used, regions, data, ends, start,
 *              prefix) -> (count, next_avail, next_used)
 *       Copy `prefix` + frame into the next available chain for each frame of the batch
 *       (data, ends) from frame `start` on, in order, while that chain is ONE device-writable
 *       descriptor (no NEXT, no INDIRECT) in one region with room for it; then publish the
 *       used elements (id, bytes written) and the used index once. The first frame that does
 *       not fit so stops it and its chain stays available.
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

/* One simple chain found by scan_frames: its head and its buffer past `skip`. */
typedef struct {
    uint16_t head;
    uint32_t len;
    const char *data;
    region_t *reg;
    uint64_t off;
} simple_t;

typedef struct {
    PyObject *desc_obj, *avail_obj, *regions_obj;
    unsigned int size, next_avail, limit, want, skip, zero_prefix;
    unsigned long long min_len, max_len;
    PyObject *into; /* pop_batch's buffer */
} pop_args;

static int
parse_pop_args(PyObject *args, pop_args *a, int batch)
{
    a->into = NULL;
    if (!PyArg_ParseTuple(args, batch ? "OOIIIIOIKKIO" : "OOIIIIOIKKI", &a->desc_obj,
                          &a->avail_obj, &a->size, &a->next_avail, &a->limit, &a->want,
                          &a->regions_obj, &a->skip, &a->min_len, &a->max_len,
                          &a->zero_prefix, &a->into))
        return -1;
    if (a->size == 0 || a->size > 32768 || a->next_avail > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "queue size or index out of range");
        return -1;
    }
    if (a->min_len < (unsigned long long)a->skip + a->zero_prefix)
        a->min_len = (unsigned long long)a->skip + a->zero_prefix; /* the data and the check */
    return 0;
}

/*
 * The simple chains available (see pop_frames), at most a->limit of them and max_bytes of
 * frames, into `out` (room for min(limit, size)); returns how many. Each descriptor is
 * read once.
 */
static unsigned int
scan_frames(const pop_args *a, const unsigned char *table, const unsigned char *ring,
            region_t *regions, Py_ssize_t nregions, uint64_t max_bytes, simple_t *out)
{
    Py_ssize_t last = 0;
    uint64_t total = 0;
    unsigned int n = available(ring, a->size, a->next_avail), count = 0;
    if (n > a->limit)
        n = a->limit;
    for (unsigned int i = 0; i < n; i++) {
        uint16_t head, flags;
        uint64_t addr;
        uint32_t len;
        if (!slot_desc(ring, table, a->size, a->next_avail + i, &head, &addr, &len, &flags))
            break;
        if (flags != a->want || len < a->min_len || len > a->max_len)
            break;
        total += len - a->skip;
        if (total > max_bytes)
            break;
        region_t *reg = find_region(regions, nregions, &last, addr, len);
        if (reg == NULL)
            break;
        uint64_t off = addr - reg->gpa;
        const unsigned char *p = (const unsigned char *)reg->base + off;
        unsigned int z;
        for (z = 0; z < a->zero_prefix && p[z] == 0; z++)
            ;
        if (z < a->zero_prefix)
            break;
        out[count].head = head;
        out[count].len = len - a->skip;
        out[count].data = (const char *)p + a->skip;
        out[count].reg = reg;
        out[count].off = off + a->skip;
        count++;
    }
    return count;
}

/*
 * The frames of `found` as the result's first item: memoryviews of guest memory (views), or
 * copied back to back into `into` with their end offsets as native uint32s (batch); and
 * the heads (split) or buffer ids (packed) as native uint16s. NULL on error.
 */
static int
frames_result(const simple_t *found, unsigned int count, Py_buffer *into, PyObject **frames,
              PyObject **heads)
{
    *heads = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)2 * count);
    if (*heads == NULL)
        return -1;
    uint16_t *head_out = (uint16_t *)PyBytes_AS_STRING(*heads);
    for (unsigned int i = 0; i < count; i++)
        head_out[i] = found[i].head;
    if (into != NULL) {
        *frames = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)4 * count);
        if (*frames == NULL)
            return -1;
        char *dst = into->buf; /* the scan kept the total within into->len */
        uint32_t *end_out = (uint32_t *)PyBytes_AS_STRING(*frames);
        uint32_t pos = 0;
        for (unsigned int i = 0; i < count; i++) {
            memcpy(dst + pos, found[i].data, found[i].len);
            pos += found[i].len;
            end_out[i] = pos;
        }
        return 0;
    }
    *frames = PyList_New(count);
    if (*frames == NULL)
        return -1;
    for (unsigned int i = 0; i < count; i++) {
        PyObject *view = PySequence_GetSlice(found[i].reg->buf, (Py_ssize_t)found[i].off,
                                             (Py_ssize_t)(found[i].off + found[i].len));
        if (view == NULL)
            return -1;
        PyList_SET_ITEM(*frames, i, view);
    }
    return 0;
}

/* Hold pop_batch's buffer `obj` (writable, under 4 GiB). */
static int
hold_into(PyObject *obj, Py_buffer *into)
{
    if (get_buffer(obj, into, 0, 1, "batch buffer") < 0)
        return -1;
    if ((uint64_t)into->len > 0xFFFFFFFFu) {
        PyBuffer_Release(into);
        PyErr_SetString(PyExc_ValueError, "batch buffer of 4 GiB or more");
        return -1;
    }
    return 0;
}

/* pop_frames and pop_batch: hold the rings and regions, scan, then build the result. */
static PyObject *
pop_simple(PyObject *args, int batch)
{
    pop_args a;
    if (parse_pop_args(args, &a, batch) < 0)
        return NULL;
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0;
    Py_buffer desc, avail, into;
    PyObject *frames = NULL, *heads = NULL, *result = NULL;
    simple_t *found = NULL;

    if (batch && hold_into(a.into, &into) < 0)
        return NULL;
    if (get_buffer(a.desc_obj, &desc, (Py_ssize_t)16 * a.size, 0, "descriptor table") < 0) {
        if (batch)
            PyBuffer_Release(&into);
        return NULL;
    }
    if (get_buffer(a.avail_obj, &avail, 4 + (Py_ssize_t)2 * a.size, 0, "available ring") < 0) {
        PyBuffer_Release(&desc);
        if (batch)
            PyBuffer_Release(&into);
        return NULL;
    }
    if (hold_regions(a.regions_obj, regions, held, &nregions) < 0)
        goto out;
    found = PyMem_Malloc(sizeof(simple_t) * (a.limit < a.size ? a.limit : a.size) + 1);
    if (found == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    unsigned int count = scan_frames(&a, desc.buf, avail.buf, regions, nregions,
                                     batch ? (uint64_t)into.len : UINT64_MAX, found);
    if (frames_result(found, count, batch ? &into : NULL, &frames, &heads) < 0)
        goto out;
    result = Py_BuildValue("(OOI)", frames, heads, (unsigned int)((a.next_avail + count) & 0xFFFF));
out:
    PyMem_Free(found);
    Py_XDECREF(frames);
    Py_XDECREF(heads);
    release_regions(held, nregions);
    PyBuffer_Release(&avail);
    PyBuffer_Release(&desc);
    if (batch)
        PyBuffer_Release(&into);
    return result;
}

static PyObject *
pop_frames(PyObject *self, PyObject *args)
{
    return pop_simple(args, 0);
}

static PyObject *
pop_batch(PyObject *self, PyObject *args)
{
    return pop_simple(args, 1);
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
fill_batch(PyObject *self, PyObject *args)
{
    PyObject *desc_obj, *avail_obj, *used_obj, *regions_obj;
    unsigned int size, next_avail, next_used;
    Py_ssize_t start;
    Py_buffer data, ends, prefix;
    if (!PyArg_ParseTuple(args, "OOOIIIOy*y*ny*", &desc_obj, &avail_obj, &used_obj, &size,
                          &next_avail, &next_used, &regions_obj, &data, &ends, &start,
                          &prefix))
        return NULL;
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0, count = 0, last = 0;
    Py_buffer desc, avail, used;
    PyObject *result = NULL;
    int have_desc = 0, have_avail = 0, have_used = 0;
    Py_ssize_t nframes = ends.len / 4;

    if (size == 0 || size > 32768 || next_avail > 0xFFFF || next_used > 0xFFFF ||
        ends.len % 4 || start < 0 || start > nframes) {
        PyErr_SetString(PyExc_ValueError, "queue size, index or batch out of range");
        goto out;
    }
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

    const uint32_t *end = ends.buf;
    uint32_t from = start ? end[start - 1] : 0;
    const unsigned char *ring = avail.buf;
    Py_ssize_t n = available(ring, size, next_avail);
    if (n > nframes - start)
        n = nframes - start;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t head, flags;
        uint64_t addr;
        uint32_t len, to = end[start + i];
        if (to < from || to > (uint64_t)data.len) {
            PyErr_SetString(PyExc_ValueError, "frame ends out of order or past the data");
            goto out;
        }
        if (!slot_desc(ring, desc.buf, size, next_avail + (unsigned int)i, &head, &addr, &len,
                       &flags))
            break;
        if (flags != 2 /* VIRTQ_DESC_F_WRITE alone */)
            break;
        uint64_t need = (uint64_t)prefix.len + (to - from);
        region_t *reg = need <= len ? find_region(regions, nregions, &last, addr, need) : NULL;
        if (reg == NULL)
            break;
        char *p = reg->base + (addr - reg->gpa);
        memcpy(p, prefix.buf, prefix.len);
        memcpy(p + prefix.len, (const char *)data.buf + from, to - from);
        put_used(used.buf, size, (uint16_t)(next_used + count), head, (uint32_t)need);
        count++;
        from = to;
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
    PyBuffer_Release(&data);
    PyBuffer_Release(&ends);
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

/* -- packed virtqueues (section 2.8) ------------------------------------------------------ */

#define PACKED_AVAIL 0x0080u /* VIRTQ_DESC_F_AVAIL */
#define PACKED_WRAP 0x8080u  /* VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED */
#define DESC_WRITE 0x0002u

/* One step of a packed ring position: wrapping flips the expected AVAIL/USED bits. */
static void
packed_step(unsigned int size, unsigned int *pos, unsigned int *bits)
{
    if (++*pos == size) {
        *pos = 0;
        *bits ^= PACKED_WRAP;
    }
}

/*
 * The simple descriptors available from *pos on (flags exactly *bits | want: available in
 * this lap, no NEXT, no INDIRECT), at most `limit`, as pop_frames' scan_frames takes them;
 * advances *pos and *bits past them. Flags are read before the rest (acquire).
 */
static unsigned int
scan_packed(const unsigned char *ring, unsigned int size, unsigned int *pos, unsigned int *bits,
            unsigned int limit, unsigned int want, region_t *regions, Py_ssize_t nregions,
            unsigned int skip, uint64_t min_len, uint64_t max_len, unsigned int zero_prefix,
            uint64_t max_bytes, simple_t *out)
{
    Py_ssize_t last = 0;
    uint64_t total = 0;
    unsigned int count = 0;
    while (count < limit) {
        const unsigned char *d = ring + 16 * (size_t)*pos;
        uint16_t flags, id;
        uint64_t addr;
        uint32_t len;
        memcpy(&flags, d + 14, 2);
        if (flags != (*bits | want))
            break;
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the flags before what they cover */
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&id, d + 12, 2);
        if (len < min_len || len > max_len)
            break;
        total += len - skip;
        if (total > max_bytes)
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
        out[count].head = id;
        out[count].len = len - skip;
        out[count].data = (const char *)p + skip;
        out[count].reg = reg;
        out[count].off = off + skip;
        count++;
        packed_step(size, pos, bits);
    }
    return count;
}

/*
 * Used descriptors for `ids` (one descriptor each) from *used_pos on: id and length first,
 * the flags of all but the first at once, the first's flags last after a release fence, so
 * the driver sees the whole batch together (2.8.9, 2.8.21).
 */
static void
packed_put_used(unsigned char *ring, unsigned int size, unsigned int *used_pos,
                unsigned int *used_wrap, const uint16_t *ids, const uint32_t *lens,
                uint32_t one_len, Py_ssize_t count)
{
    unsigned char *first = NULL;
    uint16_t first_flags = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned char *d = ring + 16 * (size_t)*used_pos;
        uint32_t len = lens != NULL ? lens[i] : one_len;
        uint16_t flags = (uint16_t)((*used_wrap ? PACKED_WRAP : 0) | (len ? DESC_WRITE : 0));
        memcpy(d + 8, &len, 4);
        memcpy(d + 12, &ids[i], 2);
        if (i == 0) {
            first = d;
            first_flags = flags;
        } else {
            memcpy(d + 14, &flags, 2);
        }
        if (++*used_pos == size) {
            *used_pos = 0;
            *used_wrap ^= 1;
        }
    }
    if (first != NULL) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(first + 14, &first_flags, 2);
    }
}

static int
packed_args_ok(unsigned int size, unsigned int pos, unsigned int bits)
{
    if (size == 0 || size > 32768 || pos >= size || (bits != PACKED_AVAIL && bits != 0x8000u)) {
        PyErr_SetString(PyExc_ValueError, "packed ring size, position or wrap bits out of range");
        return 0;
    }
    return 1;
}

static PyObject *
packed_pop(PyObject *self, PyObject *args)
{
    PyObject *ring_obj, *regions_obj, *into_obj = Py_None;
    unsigned int size, pos, bits, limit, want, skip, zero_prefix;
    unsigned long long min_len, max_len;
    if (!PyArg_ParseTuple(args, "OIIIIIOIKKI|O", &ring_obj, &size, &pos, &bits, &limit, &want,
                          &regions_obj, &skip, &min_len, &max_len, &zero_prefix, &into_obj))
        return NULL;
    if (!packed_args_ok(size, pos, bits))
        return NULL;
    if (min_len < (unsigned long long)skip + zero_prefix)
        min_len = (unsigned long long)skip + zero_prefix;
    int batch = into_obj != Py_None;
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0;
    Py_buffer ring, into;
    PyObject *frames = NULL, *ids = NULL, *result = NULL;
    simple_t *found = NULL;
    if (batch && hold_into(into_obj, &into) < 0)
        return NULL;
    if (get_buffer(ring_obj, &ring, (Py_ssize_t)16 * size, 0, "descriptor ring") < 0) {
        if (batch)
            PyBuffer_Release(&into);
        return NULL;
    }
    if (hold_regions(regions_obj, regions, held, &nregions) < 0)
        goto out;
    if (limit > size)
        limit = size; /* one lap at most */
    found = PyMem_Malloc(sizeof(simple_t) * limit + 1);
    if (found == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    unsigned int count = scan_packed(ring.buf, size, &pos, &bits, limit, want, regions,
                                     nregions, skip, min_len, max_len, zero_prefix,
                                     batch ? (uint64_t)into.len : UINT64_MAX, found);
    if (frames_result(found, count, batch ? &into : NULL, &frames, &ids) < 0)
        goto out;
    result = Py_BuildValue("(OOII)", frames, ids, pos, bits);
out:
    PyMem_Free(found);
    Py_XDECREF(frames);
    Py_XDECREF(ids);
    release_regions(held, nregions);
    PyBuffer_Release(&ring);
    if (batch)
        PyBuffer_Release(&into);
    return result;
}

static PyObject *
packed_fill(PyObject *self, PyObject *args)
{
    PyObject *ring_obj, *regions_obj;
    unsigned int size, pos, bits, used_pos, used_wrap;
    Py_ssize_t start;
    Py_buffer data, ends, prefix, ring;
    if (!PyArg_ParseTuple(args, "OIIIIIOy*y*ny*", &ring_obj, &size, &pos, &bits, &used_pos,
                          &used_wrap, &regions_obj, &data, &ends, &start, &prefix))
        return NULL;
    region_t regions[MAX_REGIONS];
    held_buffer held[MAX_REGIONS];
    Py_ssize_t nregions = 0, count = 0, last = 0, nframes = ends.len / 4;
    PyObject *result = NULL;
    uint16_t *ids = NULL;
    uint32_t *lens = NULL;
    int have_ring = 0;
    if (!packed_args_ok(size, pos, bits) || used_pos >= size || used_wrap > 1 || ends.len % 4 ||
        start < 0 || start > nframes) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "used position, wrap or batch out of range");
        goto out;
    }
    if (get_buffer(ring_obj, &ring, (Py_ssize_t)16 * size, 1, "descriptor ring") < 0)
        goto out;
    have_ring = 1;
    if (hold_regions(regions_obj, regions, held, &nregions) < 0)
        goto out;
    Py_ssize_t n = nframes - start;
    if (n > (Py_ssize_t)size)
        n = size; /* one lap at most */
    ids = PyMem_Malloc(sizeof(uint16_t) * n + 1);
    lens = PyMem_Malloc(sizeof(uint32_t) * n + 1);
    if (ids == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    const uint32_t *end = ends.buf;
    uint32_t from = start ? end[start - 1] : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t to = end[start + i];
        if (to < from || to > (uint64_t)data.len) {
            PyErr_SetString(PyExc_ValueError, "frame ends out of order or past the data");
            goto out;
        }
        const unsigned char *d = (const unsigned char *)ring.buf + 16 * (size_t)pos;
        uint16_t flags, id;
        uint64_t addr;
        uint32_t len;
        memcpy(&flags, d + 14, 2);
        if (flags != (bits | DESC_WRITE))
            break;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&id, d + 12, 2);
        uint64_t need = (uint64_t)prefix.len + (to - from);
        region_t *reg = need <= len ? find_region(regions, nregions, &last, addr, need) : NULL;
        if (reg == NULL)
            break;
        char *p = reg->base + (addr - reg->gpa);
        memcpy(p, prefix.buf, prefix.len);
        memcpy(p + prefix.len, (const char *)data.buf + from, to - from);
        ids[count] = id;
        lens[count] = (uint32_t)need;
        count++;
        from = to;
        packed_step(size, &pos, &bits);
    }
    packed_put_used(ring.buf, size, &used_pos, &used_wrap, ids, lens, 0, count);
    result = Py_BuildValue("(nIIII)", count, pos, bits, used_pos, used_wrap);
out:
    PyMem_Free(ids);
    PyMem_Free(lens);
    release_regions(held, nregions);
    if (have_ring)
        PyBuffer_Release(&ring);
    PyBuffer_Release(&data);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&prefix);
    return result;
}

static PyObject *
packed_publish(PyObject *self, PyObject *args)
{
    PyObject *ring_obj;
    unsigned int size, used_pos, used_wrap, length;
    Py_buffer ids, ring;
    if (!PyArg_ParseTuple(args, "OIIIy*I", &ring_obj, &size, &used_pos, &used_wrap, &ids,
                          &length))
        return NULL;
    if (size == 0 || size > 32768 || used_pos >= size || used_wrap > 1 || ids.len % 2 ||
        ids.len / 2 > (Py_ssize_t)size) {
        PyBuffer_Release(&ids);
        PyErr_SetString(PyExc_ValueError, "packed ring size, used position or ids out of range");
        return NULL;
    }
    if (get_buffer(ring_obj, &ring, (Py_ssize_t)16 * size, 1, "descriptor ring") < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    packed_put_used(ring.buf, size, &used_pos, &used_wrap, ids.buf, NULL, length, ids.len / 2);
    PyBuffer_Release(&ring);
    PyBuffer_Release(&ids);
    return Py_BuildValue("(II)", used_pos, used_wrap);
}

static PyMethodDef methods[] = {
    {"pop_frames", pop_frames, METH_VARARGS,
     "Take available one-descriptor chains as memoryviews (see the module source)."},
    {"pop_batch", pop_batch, METH_VARARGS,
     "Take available one-descriptor chains as one frame batch (see the module source)."},
    {"fill_batch", fill_batch, METH_VARARGS,
     "Copy a batch's frames into available one-buffer writable chains; publish them."},
    {"packed_pop", packed_pop, METH_VARARGS,
     "pop_frames / pop_batch on a packed ring (see packed.py)."},
    {"packed_fill", packed_fill, METH_VARARGS,
     "fill_batch on a packed ring: copy frames into one-buffer chains, mark them used."},
    {"packed_publish", packed_publish, METH_VARARGS,
     "Used descriptors for one-descriptor buffers, the first's flags last."},
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
