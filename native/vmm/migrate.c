/*
 * Live-migration helpers: per-page hashes of guest memory (verification), gathering and
 * scattering pages by index, dropping host pages (post-copy), userfaultfd (post-copy demand
 * faults) and the vCPU's TSC frequency.
 *
 * The stream itself is Python (vlab/migrate.py); what lives here is what touches every page
 * and must not cost a Python call per page.
 */
#include "internal.h"
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

/* ---------------- page hashes ---------------- */

#define H1 0x9E3779B185EBCA87ULL
#define H2 0xC2B2AE3D27D4EB4FULL
#define H3 0x165667B19E3779F9ULL
#define H4 0x85EBCA77C2B2AE63ULL

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t lane(uint64_t acc, uint64_t w)
{
    return rotl64(acc + w * H2, 31) * H1;
}

/* A 64-bit hash of one 4 KiB page: four independent multiply-rotate lanes, then a final mix.
 * Not cryptographic: it tells a stale page from a fresh one, which is all verification asks. */
static uint64_t page_hash(const uint64_t *w)
{
    uint64_t a = H1 + H2, b = H2, c = 0, d = -H1, h;

    for (int i = 0; i < 512; i += 4) {
        a = lane(a, w[i]);
        b = lane(b, w[i + 1]);
        c = lane(c, w[i + 2]);
        d = lane(d, w[i + 3]);
    }
    h = rotl64(a, 1) + rotl64(b, 7) + rotl64(c, 12) + rotl64(d, 18);
    h ^= h >> 33;
    h *= H2;
    h ^= h >> 29;
    h *= H3;
    h ^= h >> 32;
    return h;
}

/* out[i] = hash of page idx[i] of the region at base (n_pages long); idx NULL: pages 0..n-1. */
int vlab_mem_page_hashes(const void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                         uint64_t *out)
{
    const uint8_t *b = base;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t p = idx ? idx[i] : i;

        if (p >= n_pages)
            return vlab_fail(ERANGE, "vlab_mem_page_hashes", "page %llu outside %llu pages",
                             (unsigned long long)p, (unsigned long long)n_pages);
        out[i] = page_hash((const uint64_t *)(b + p * VLAB_PAGE));
    }
    return 0;
}

/* Hash pages given as a packed buffer (n pages back to back). */
int vlab_mem_buffer_hashes(const void *buf, uint64_t n, uint64_t *out)
{
    const uint8_t *b = buf;

    for (uint64_t i = 0; i < n; i++)
        out[i] = page_hash((const uint64_t *)(b + i * VLAB_PAGE));
    return 0;
}

/* ---------------- gather / scatter ---------------- */

/* Copy pages idx[0..n) of the region into out, back to back; if hashes is not NULL, hash each
 * copy (what is sent, even if the guest writes the original meanwhile). */
int vlab_mem_gather(const void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                    void *out, uint64_t *hashes)
{
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *dst = (uint8_t *)out + i * VLAB_PAGE;

        if (idx[i] >= n_pages)
            return vlab_fail(ERANGE, "vlab_mem_gather", "page %llu outside %llu pages",
                             (unsigned long long)idx[i], (unsigned long long)n_pages);
        memcpy(dst, (const uint8_t *)base + idx[i] * VLAB_PAGE, VLAB_PAGE);
        if (hashes)
            hashes[i] = page_hash((const uint64_t *)dst);
    }
    return 0;
}

/* Copy n packed pages into the region, page i to page idx[i]; if hashes is not NULL, hash each
 * page as it now is in the region (read back), so verification sees the destination's memory
 * and not the buffer it came from. */
int vlab_mem_scatter(void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                     const void *in, uint64_t *hashes)
{
    for (uint64_t i = 0; i < n; i++)
        if (idx[i] >= n_pages)
            return vlab_fail(ERANGE, "vlab_mem_scatter", "page %llu outside %llu pages",
                             (unsigned long long)idx[i], (unsigned long long)n_pages);
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *dst = (uint8_t *)base + idx[i] * VLAB_PAGE;

        memcpy(dst, (const uint8_t *)in + i * VLAB_PAGE, VLAB_PAGE);
        if (hashes)
            hashes[i] = page_hash((const uint64_t *)dst);
    }
    return 0;
}

/* Give host pages back (MADV_DONTNEED): anonymous private memory reads as missing again, so a
 * userfaultfd registered on it reports the next access. */
int vlab_mem_discard(void *addr, uint64_t len)
{
    if (madvise(addr, len, MADV_DONTNEED))
        return vlab_fail_errno("madvise", "MADV_DONTNEED %#llx bytes", (unsigned long long)len);
    return 0;
}

/* Discard the pages idx[0..n) (sorted, ascending) of the region: one madvise per run of
 * consecutive pages. Returns the number of madvise calls made. */
int vlab_mem_discard_pages(void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n)
{
    uint64_t i = 0;
    int calls = 0;

    while (i < n) {
        uint64_t a = idx[i], b = a;

        if (a >= n_pages || (i && idx[i] <= idx[i - 1]))
            return vlab_fail(EINVAL, "vlab_mem_discard_pages", "page %llu out of order or "
                             "outside %llu pages", (unsigned long long)a,
                             (unsigned long long)n_pages);
        while (i + 1 < n && idx[i + 1] == b + 1 && b + 1 < n_pages) {
            b++;
            i++;
        }
        i++;
        if (madvise((uint8_t *)base + a * VLAB_PAGE, (b - a + 1) * VLAB_PAGE, MADV_DONTNEED))
            return vlab_fail_errno("madvise", "MADV_DONTNEED pages %llu..%llu",
                                   (unsigned long long)a, (unsigned long long)b);
        calls++;
    }
    return calls;
}

/* *addr += delta; returns the new value. For the VMM's own writes to guest memory that may
 * still be missing under userfaultfd: the access can block until the page arrives, and it
 * must do so here, in C, where Python's lock is released, not in Python code. */
uint64_t vlab_mem_add_u64(void *addr, uint64_t delta)
{
    volatile uint64_t *p = addr;

    *p = *p + delta;
    return *p;
}

/* ---------------- userfaultfd ---------------- */

/* Open a userfaultfd (the syscall, then /dev/userfaultfd) and negotiate the API. Faults from
 * the kernel (KVM touching guest memory for a vCPU) must be reported, so no USER_MODE_ONLY. */
int vlab_uffd_open(uint64_t features, uint64_t *features_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    int fd = -1;

#ifdef SYS_userfaultfd
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
#endif
    if (fd < 0) {
        int err = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

        if (dev < 0) {
            errno = err;
            return vlab_fail_errno("userfaultfd", "syscall failed and /dev/userfaultfd "
                                   "cannot be opened");
        }
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd < 0)
            return vlab_fail_errno("USERFAULTFD_IOC_NEW", NULL);
    }
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int r = vlab_fail_errno("UFFDIO_API", "features %#llx", (unsigned long long)features);

        close(fd);
        return r;
    }
    if (features_out)
        *features_out = api.features;
    return fd;
}

/* Register [addr, addr+len) for missing-page faults; returns the ioctls the range supports. */
int vlab_uffd_register(int fd, void *addr, uint64_t len, uint64_t *ioctls_out)
{
    struct uffdio_register reg = {
        .range = { .start = (uintptr_t)addr, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };

    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return vlab_fail_errno("UFFDIO_REGISTER", "%#llx bytes", (unsigned long long)len);
    if (ioctls_out)
        *ioctls_out = reg.ioctls;
    return 0;
}

int vlab_uffd_unregister(int fd, void *addr, uint64_t len)
{
    struct uffdio_range r = { .start = (uintptr_t)addr, .len = len };

    if (ioctl(fd, UFFDIO_UNREGISTER, &r) < 0)
        return vlab_fail_errno("UFFDIO_UNREGISTER", NULL);
    return 0;
}

/* Wait up to timeout_ms for page faults; store up to cap faulting addresses. Returns how many
 * (0 on timeout). Other events are ignored. */
int vlab_uffd_read(int fd, int timeout_ms, uint64_t *addrs, uint32_t cap)
{
    struct uffd_msg msg[64];
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int r, n = 0;
    ssize_t got;

    r = poll(&pfd, 1, timeout_ms);
    if (r < 0) {
        if (errno == EINTR)
            return 0;
        return vlab_fail_errno("poll", "userfaultfd");
    }
    if (!r)
        return 0;
    if (cap > 64)
        cap = 64;
    got = read(fd, msg, sizeof(msg[0]) * cap);
    if (got < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return vlab_fail_errno("read", "userfaultfd");
    }
    for (ssize_t i = 0; i < got / (ssize_t)sizeof(msg[0]); i++)
        if (msg[i].event == UFFD_EVENT_PAGEFAULT)
            addrs[n++] = msg[i].arg.pagefault.address;
    return n;
}

/* UFFDIO_COPY len bytes (whole pages) to dst and wake the waiters. *copied says how many bytes
 * went in. Returns 0 when all did, 1 when it stopped at a page that is already present
 * (EEXIST: the caller skips that page), 2 when the kernel asked to retry (EAGAIN). */
int vlab_uffd_copy(int fd, void *dst, const void *src, uint64_t len, uint64_t *copied)
{
    struct uffdio_copy c = { .dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len };

    *copied = 0;
    if (ioctl(fd, UFFDIO_COPY, &c) < 0) {
        int err = errno;

        *copied = c.copy > 0 ? (uint64_t)c.copy : 0;
        if (err == EEXIST)
            return 1;
        if (err == EAGAIN)
            return 2;
        errno = err;
        return vlab_fail_errno("UFFDIO_COPY", "dst %p len %#llx", dst, (unsigned long long)len);
    }
    *copied = (uint64_t)c.copy;
    return 0;
}

int vlab_uffd_wake(int fd, void *addr, uint64_t len)
{
    struct uffdio_range r = { .start = (uintptr_t)addr, .len = len };

    if (ioctl(fd, UFFDIO_WAKE, &r) < 0)
        return vlab_fail_errno("UFFDIO_WAKE", NULL);
    return 0;
}

/* ---------------- TSC ---------------- */

int vlab_vcpu_set_tsc_khz(struct vlab_vcpu *v, uint32_t khz)
{
    if (ioctl(v->fd, KVM_SET_TSC_KHZ, (unsigned long)khz) < 0)
        return vlab_fail_errno("KVM_SET_TSC_KHZ", "%u kHz", khz);
    return 0;
}

/* ---------------- kick ---------------- */

/*
 * Make a vCPU that is inside KVM_RUN on another thread come back to its run loop now: send
 * that thread the run loop's watchdog signal (vcpu.c: SIGRTMIN + 5, whose handler sets
 * immediate_exit), so KVM_RUN returns EINTR and vlab_vcpu_run reports an interruption. Does
 * nothing (returns 0) if the vCPU never ran or the handler is not installed; 1 if sent.
 */
int vlab_vcpu_kick(struct vlab_vcpu *v)
{
    struct sigaction old;
    int sig = SIGRTMIN + 5;

    if (!v->timer_ok || v->timer_tid <= 0)
        return 0;
    if (sigaction(sig, NULL, &old) || old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN)
        return 0;
    if (syscall(SYS_tgkill, getpid(), v->timer_tid, sig)) {
        if (errno == ESRCH)
            return 0;
        return vlab_fail_errno("tgkill", "kick vCPU %d", v->id);
    }
    return 1;
}
