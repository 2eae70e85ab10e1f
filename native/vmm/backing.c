/*
 * Host memory with a chosen backing: the one allocator behind guest memory slots (slot.c) and
 * the paging kernels run on the host (paging_native.c), so both measure the same memory.
 *
 *   4k         anonymous private memory, MADV_NOHUGEPAGE (khugepaged may not collapse it)
 *   thp        anonymous private memory aligned to 2 MiB, MADV_HUGEPAGE
 *   hugetlb    MAP_HUGETLB 2 MiB or 1 GiB pages from the reserved pool (nr_hugepages)
 *   memfd      a shared memfd, new or a duplicate of share_fd (two VMs over the same memory)
 *
 * Anonymous memory is over-allocated by one backing page so that its start can be aligned to
 * it (a THP slot then starts on a 2 MiB boundary). Every failure names the syscall and errno.
 */
#include "internal.h"
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif
#ifndef MAP_HUGE_1GB
#define MAP_HUGE_1GB (30 << 26)
#endif

uint64_t vlab_backing_page(int kind)
{
    switch (kind) {
    case VLAB_BACKING_THP: case VLAB_BACKING_HUGETLB_2M: return 2ULL << 20;
    case VLAB_BACKING_HUGETLB_1G: return 1ULL << 30;
    default: return VLAB_PAGE;
    }
}

static int alloc_anon(struct vlab_backing *b, uint64_t size, int kind)
{
    uint64_t align = vlab_backing_page(kind);
    size_t len = size + align;
    void *p;

    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
             -1, 0);
    if (p == MAP_FAILED)
        return vlab_fail_errno("mmap", "anonymous %llu bytes", (unsigned long long)size);
    b->map = p;
    b->map_len = len;
    b->hva = (void *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
    if (madvise(b->hva, size, kind == VLAB_BACKING_THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
        return vlab_fail_errno("madvise", kind == VLAB_BACKING_THP ? "MADV_HUGEPAGE"
                               : "MADV_NOHUGEPAGE");
    return 0;
}

static int alloc_hugetlb(struct vlab_backing *b, uint64_t size, int kind)
{
    uint64_t hp = vlab_backing_page(kind);
    int two_m = kind == VLAB_BACKING_HUGETLB_2M;
    void *p;

    if (size % hp)
        return vlab_fail(EINVAL, "mmap", "hugetlb size %#llx is not a multiple of %llu MiB",
                         (unsigned long long)size, (unsigned long long)(hp >> 20));
    p = mmap(NULL, size, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | (two_m ? MAP_HUGE_2MB : MAP_HUGE_1GB),
             -1, 0);
    if (p == MAP_FAILED)
        return vlab_fail_errno("mmap", "MAP_HUGETLB %s, %llu bytes: not enough huge pages "
                               "reserved (see /sys/kernel/mm/hugepages/hugepages-%skB/"
                               "nr_hugepages)", two_m ? "2 MiB" : "1 GiB",
                               (unsigned long long)size, two_m ? "2048" : "1048576");
    b->map = b->hva = p;
    b->map_len = size;
    return 0;
}

static int alloc_memfd(struct vlab_backing *b, uint64_t size, int share_fd)
{
    int fd;
    void *p;

    if (share_fd < 0) {
        fd = memfd_create("vlab-shared", MFD_CLOEXEC);
        if (fd < 0)
            return vlab_fail_errno("memfd_create", NULL);
        b->fd = fd;
        if (ftruncate(fd, size))
            return vlab_fail_errno("ftruncate", "memfd to %llu bytes", (unsigned long long)size);
    } else {
        fd = fcntl(share_fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0)
            return vlab_fail_errno("fcntl", "F_DUPFD_CLOEXEC of shared memfd");
        b->fd = fd;
    }
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return vlab_fail_errno("mmap", "shared memfd %llu bytes", (unsigned long long)size);
    b->map = b->hva = p;
    b->map_len = size;
    return 0;
}

/*
 * Allocate `size` bytes (a multiple of 4 KiB; the caller checks its own stricter rules) with
 * backing `kind` (VLAB_BACKING_*). share_fd: for memfd, an existing memfd to map instead of a
 * new one (-1: new). `op` names the caller in the error for an unknown backing. On failure
 * nothing stays allocated and *b is empty.
 */
int vlab_backing_alloc(struct vlab_backing *b, uint64_t size, int kind, int share_fd,
                       const char *op)
{
    int r;

    memset(b, 0, sizeof(*b));
    b->fd = -1;
    switch (kind) {
    case VLAB_BACKING_4K:
    case VLAB_BACKING_THP:
        r = alloc_anon(b, size, kind);
        break;
    case VLAB_BACKING_HUGETLB_2M:
    case VLAB_BACKING_HUGETLB_1G:
        r = alloc_hugetlb(b, size, kind);
        break;
    case VLAB_BACKING_MEMFD:
        r = alloc_memfd(b, size, share_fd);
        break;
    default:
        return vlab_fail(EINVAL, op, "unknown backing %d", kind);
    }
    if (r)
        vlab_backing_free(b);       /* the error record is already written */
    return r;
}

/* Unmap and close what vlab_backing_alloc made; memory it did not map (map NULL) is left. */
void vlab_backing_free(struct vlab_backing *b)
{
    if (b->map)
        munmap(b->map, b->map_len);
    if (b->fd >= 0)
        close(b->fd);
    memset(b, 0, sizeof(*b));
    b->fd = -1;
}
