/*
 * Guest memory in bulk, for live migration: per-page hashes (verification), gathering and
 * scattering pages by index, dropping host pages (post-copy), and the VMM's own writes to memory
 * that may still be missing under userfaultfd.
 *
 * The stream itself is Python (vlab.migration); what lives here is what touches every page
 * and must not cost a Python call per page.
 */
#include "internal.h"
#include <string.h>
#include <sys/mman.h>

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
