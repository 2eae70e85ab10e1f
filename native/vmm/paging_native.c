/*
 * Paging kernels on the host (`where=native`): the same kernels the guest payload runs
 * (native/kernels/paging_kernels.h, included by both), over host memory with a chosen backing
 * (backing.c, as guest slots), plus the memory helpers the experiments need for guest slots too
 * (fill, ring build, reset).
 */
#include "internal.h"
#include <string.h>
#include <sys/mman.h>
#include "../kernels/paging_kernels.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Host memory for the kernels, from the allocator guest slots use (backing.c). The size must
 * be whole backing pages, and the backing 4k, thp or hugetlb (no memfd). */
int vlab_paging_mem_alloc(struct vlab_paging_mem *m, uint64_t size, int backing)
{
    uint64_t page = vlab_backing_page(backing);
    struct vlab_backing b;
    int r;

    memset(m, 0, sizeof(*m));
    if (!size || size % page)
        return vlab_fail(EINVAL, "vlab_paging_mem_alloc", "size %#llx is not a positive multiple "
                         "of the %llu KiB backing page", (unsigned long long)size,
                         (unsigned long long)(page >> 10));
    if (backing != VLAB_BACKING_4K && backing != VLAB_BACKING_THP &&
        backing != VLAB_BACKING_HUGETLB_2M && backing != VLAB_BACKING_HUGETLB_1G)
        return vlab_fail(EINVAL, "vlab_paging_mem_alloc", "backing %d is not 4k/thp/hugetlb",
                         backing);
    r = vlab_backing_alloc(&b, size, backing, -1, "vlab_paging_mem_alloc");
    if (r)
        return r;
    m->hva = b.hva;
    m->map = b.map;
    m->map_len = b.map_len;
    m->size = size;
    m->backing = backing;
    return 0;
}

void vlab_paging_mem_free(struct vlab_paging_mem *m)
{
    struct vlab_backing b = { .hva = m->hva, .map = m->map, .map_len = m->map_len, .fd = -1 };

    vlab_backing_free(&b);
    memset(m, 0, sizeof(*m));
}

/*
 * Give [hva, hva+len) back to the kernel (MADV_DONTNEED: the next access faults in a fresh
 * zeroed page, and KVM's MMU notifier drops any guest translation of it), then, with
 * `populate`, fault it in again from the host side (MADV_POPULATE_WRITE) so only the
 * translation is missing, not the page.
 */
int vlab_paging_mem_reset(void *hva, uint64_t len, int populate)
{
    if (madvise(hva, len, MADV_DONTNEED))
        return vlab_fail_errno("madvise", "MADV_DONTNEED %llu bytes", (unsigned long long)len);
    if (populate && madvise(hva, len, MADV_POPULATE_WRITE))
        return vlab_fail_errno("madvise", "MADV_POPULATE_WRITE %llu bytes",
                               (unsigned long long)len);
    return 0;
}

uint64_t vlab_paging_word(uint64_t index, uint64_t salt)
{
    return pk_word(index, salt);
}

void vlab_paging_fill(void *base, uint64_t nwords, uint64_t salt)
{
    pk_fill(base, nwords, salt);
}

void vlab_paging_chase_build(void *base, uint64_t nnodes, uint64_t stride, uint64_t seed)
{
    if (nnodes)
        pk_chase_build(base, nnodes, stride, seed);
}

uint64_t vlab_paging_touch_read(const void *base, uint64_t npages, uint64_t stride)
{
    return pk_touch_read(base, npages, stride);
}

/* One timed sample each; return cycles (TSC). Checksums accumulate into *sum. */
uint64_t vlab_paging_random_read(const void *base, uint64_t nwords, uint64_t n, uint64_t *state,
                                 uint64_t *sum)
{
    pk_u64 st = *state, s = *sum, c = pk_time_random_read(base, nwords, n, &st, &s);

    *state = st;
    *sum = s;
    return c;
}

uint64_t vlab_paging_chase(const void *base, uint64_t *off, uint64_t n, uint64_t *sum)
{
    pk_u64 o = *off, s = *sum, c = pk_time_chase(base, &o, n, &s);

    *off = o;
    *sum = s;
    return c;
}

uint64_t vlab_paging_touch_write(void *base, uint64_t npages, uint64_t stride, uint64_t salt,
                                 uint64_t *sum)
{
    pk_u64 s = *sum, c = pk_time_touch_write(base, npages, stride, salt, &s);

    *sum = s;
    return c;
}
