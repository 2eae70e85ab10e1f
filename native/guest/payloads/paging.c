/*
 * paging: the paging experiments' guest side.
 *
 * The memory loops (random reads, pointer chase, first touch) are the shared kernels of
 * native/kernels/paging_kernels.h, the very code the host runs for `where=native`. The
 * page-table operations (PTE update + invlpg, CR3 switch) need CPL0 for one instruction each;
 * everything else runs at CPL3, and the privileged instruction goes through cpl0_call (the
 * int $4 gate). Where CPL0 is emulated (KVM on PVM) that call costs thousands of cycles by
 * itself, so each of those samples also times a no-op cpl0_call as a baseline.
 *
 * Parameters: ARG(0) is the operation; the rest are per operation (see each case below).
 * Results: per-sample cycles first, then the checksums the host verifies.
 */
#include "rt.h"
#include "../../kernels/paging_kernels.h"

enum op {
    OP_WARM = 1,        /* base, npages, stride: read one word per page; push sum */
    OP_RANDOM_READ,     /* base, nwords, n, samples, seed: push cycles[samples], sum, state */
    OP_CHASE,           /* base, start, n, samples: push cycles[samples], final offset, sum */
    OP_FIRST_TOUCH,     /* base, npages, stride, salt, clear_ad: push cycles, sum, cleared */
    OP_PTE_UPDATE,      /* base, npages, page, delta, samples, mode, salt: 4 sums per sample */
    OP_CR3_SWITCH,      /* base, npages, page, delta, ops, samples, salt: 3 sums per sample */
};

enum { MODE_REMAP = 0, MODE_UNMAP_MAP = 1 };

#define PTE_P    (1UL << 0)
#define PTE_A    (1UL << 5)
#define PTE_D    (1UL << 6)
#define PTE_PS   (1UL << 7)
#define PTE_ADDR 0x000ffffffffff000UL

/* The leaf entry mapping va in the tables rooted at root (tables are identity-mapped). */
static volatile u64 *leaf_pte(u64 root, u64 va, u64 *page)
{
    u64 table = root & PTE_ADDR;

    for (int level = 4; level >= 1; level--) {
        volatile u64 *t = (volatile u64 *)table;
        u64 e = t[(va >> (12 + 9 * (level - 1))) & 511];

        if (!(e & PTE_P))
            vlab_fail(va, "paging: address not mapped in the guest page tables");
        if (level == 1 || (e & PTE_PS)) {
            *page = 1UL << (12 + 9 * (level - 1));
            return &t[(va >> (12 + 9 * (level - 1))) & 511];
        }
        table = e & PTE_ADDR;
    }
    return 0;
}

static u64 cpl0_invlpg(u64 va, u64 unused)
{
    (void)unused;
    __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory");
    return 0;
}

static u64 cpl0_write_cr3(u64 cr3, u64 unused)
{
    (void)unused;
    __asm__ volatile("mov %0, %%cr3" :: "r"(cr3) : "memory");
    return 0;
}

static u64 cpl0_noop(u64 a, u64 unused)
{
    (void)unused;
    return a;
}

static void op_random_read(u64 id)
{
    const pk_u64 *w = (const pk_u64 *)ARG(1);
    u64 nwords = ARG(2), n = ARG(3), samples = ARG(4), state = ARG(5), sum = 0;

    GUEST_ASSERT(nwords > 0);
    for (u64 s = 0; s < samples; s++)
        result_push(id, pk_time_random_read(w, nwords, n, &state, &sum));
    result_push(id, sum);
    result_push(id, state);
}

static void op_chase(u64 id)
{
    const unsigned char *base = (const unsigned char *)ARG(1);
    u64 off = ARG(2), n = ARG(3), samples = ARG(4), sum = 0;

    for (u64 s = 0; s < samples; s++)
        result_push(id, pk_time_chase(base, &off, n, &sum));
    result_push(id, off);
    result_push(id, sum);
}

/* First touch: optionally clear the A/D bits of every page's leaf entry (untimed, so the
 * timed writes must set them again), then write one word per page. */
static void op_first_touch(u64 id)
{
    unsigned char *base = (unsigned char *)ARG(1);
    u64 npages = ARG(2), stride = ARG(3), salt = ARG(4), clear_ad = ARG(5);
    u64 cleared = 0, sum = 0, cycles;

    if (clear_ad) {
        u64 last = ~0UL;

        for (u64 i = 0; i < npages; i++) {
            u64 page;
            volatile u64 *pte = leaf_pte(PARAM(P_CR3), (u64)base + i * stride, &page);

            if ((u64)pte == last)
                continue;               /* several 4 KiB touches in one large page */
            last = (u64)pte;
            *pte = *pte & ~(PTE_A | PTE_D);
            cleared++;
        }
    }
    cycles = pk_time_touch_write(base, npages, stride, salt, &sum);
    result_push(id, cycles);
    result_push(id, sum);
    result_push(id, cleared);
}

/*
 * K no-op cpl0_calls after one untimed call: the cost of the gate alone (on PVM, entering
 * CPL0 also syncs page-table changes KVM deferred, which the untimed call absorbs).
 */
static u64 gate_baseline(u64 k)
{
    u64 t0;

    cpl0_call(cpl0_noop, 0, 0);
    t0 = pk_tsc();
    for (u64 i = 0; i < k; i++)
        cpl0_call(cpl0_noop, i, 0);
    return pk_tsc() - t0;
}

/*
 * PTE update: for each of npages pages of `page` bytes at base, change its leaf entry, invlpg
 * it (CPL0), and read the page. remap points the entry at the frame `delta` bytes away (and
 * back on the next sample); unmap_map clears the present bit, invlpg, and sets it again. The
 * read must see the frame the entry now names (a stale translation fails the guest).
 * Work KVM defers (syncing an unsync shadow table) lands in the next CPL0 entry, which is the
 * next page's invlpg, so in steady state every op pays for itself.
 * Per sample: sums of PTE-write, invlpg, read cycles, then the gate baseline of npages calls.
 */
static void op_pte_update(u64 id)
{
    u64 base = ARG(1), npages = ARG(2), page = ARG(3), delta = ARG(4), samples = ARG(5);
    u64 mode = ARG(6), salt = ARG(7), root = PARAM(P_CR3);
    u64 mask = PTE_ADDR & ~(page - 1);
    int at_b = 0;

    GUEST_ASSERT(page == 4096 || page == (2UL << 20) || page == (1UL << 30));
    GUEST_ASSERT(mode == MODE_REMAP || mode == MODE_UNMAP_MAP);
    for (u64 s = 0; s < samples; s++) {
        u64 t_write = 0, t_inv = 0, t_read = 0;
        int to_b = mode == MODE_REMAP ? !at_b : at_b;

        for (u64 j = 0; j < npages; j++) {
            u64 va = base + j * page, ps, t0, t1, t2, t3, t4, v;
            volatile u64 *pte = leaf_pte(root, va, &ps);
            u64 old = *pte, frame = base + j * page + (to_b ? delta : 0);

            GUEST_ASSERT(ps == page);
            if (mode == MODE_REMAP) {
                t0 = pk_tsc();
                *pte = (old & ~mask) | frame;
                t1 = pk_tsc();
                cpl0_call(cpl0_invlpg, va, 0);
                t2 = t3 = pk_tsc();
            } else {
                t0 = pk_tsc();
                *pte = old & ~PTE_P;
                t1 = pk_tsc();
                cpl0_call(cpl0_invlpg, va, 0);
                t2 = pk_tsc();
                *pte = old;
                t3 = pk_tsc();
            }
            v = *(volatile u64 *)va;
            t4 = pk_tsc();
            if (v != pk_word((frame - base) / 8, salt))
                vlab_fail(va, "paging: read after a PTE update saw the wrong frame");
            t_write += (t1 - t0) + (t3 - t2);
            t_inv += t2 - t1;
            t_read += t4 - t3;
        }
        at_b = to_b;
        result_push(id, t_write);
        result_push(id, t_inv);
        result_push(id, t_read);
        result_push(id, gate_baseline(npages));
    }
    if (at_b) {                         /* leave every page mapped to its own frame */
        for (u64 j = 0; j < npages; j++) {
            u64 va = base + j * page, ps;
            volatile u64 *pte = leaf_pte(root, va, &ps);

            *pte = (*pte & ~mask) | (base + j * page);
            cpl0_call(cpl0_invlpg, va, 0);
        }
    }
}

/*
 * CR3 switch between the address space the vCPU started in (P_CR3) and P_CR3_ALT, which
 * maps the same npages virtual pages at base to frames `delta` bytes further. After each
 * switch (CPL0) read one word of each page (CPL3); the sum proves which space is live.
 * Per sample: sums over `ops` switches of switch and read cycles, then the gate baseline.
 */
static void op_cr3_switch(u64 id)
{
    u64 base = ARG(1), npages = ARG(2), page = ARG(3), delta = ARG(4), ops = ARG(5);
    u64 samples = ARG(6), salt = ARG(7);
    u64 as[2] = { PARAM(P_CR3), PARAM(P_CR3_ALT) }, want[2] = { 0, 0 };
    int cur = 0;

    GUEST_ASSERT(as[1] != 0 && as[1] != as[0]);
    for (u64 j = 0; j < npages; j++) {
        want[0] += pk_word(j * page / 8, salt);
        want[1] += pk_word((delta + j * page) / 8, salt);
    }
    for (u64 s = 0; s < samples; s++) {
        u64 t_switch = 0, t_read = 0;

        for (u64 k = 0; k < ops; k++) {
            u64 t0, t1, t2, sum;

            cur ^= 1;
            t0 = pk_tsc();
            cpl0_call(cpl0_write_cr3, as[cur], 0);
            t1 = pk_tsc();
            sum = pk_touch_read((const unsigned char *)base, npages, page);
            t2 = pk_tsc();
            if (sum != want[cur])
                vlab_fail(cur, "paging: reads after a CR3 switch saw the other address space");
            t_switch += t1 - t0;
            t_read += t2 - t1;
        }
        result_push(id, t_switch);
        result_push(id, t_read);
        result_push(id, gate_baseline(ops));
    }
    if (cur)
        cpl0_call(cpl0_write_cr3, as[0], 0);
}

void payload_main(u64 id)
{
    switch (ARG(0)) {
    case OP_WARM:
        result_push(id, pk_touch_read((const unsigned char *)ARG(1), ARG(2), ARG(3)));
        break;
    case OP_RANDOM_READ:
        op_random_read(id);
        break;
    case OP_CHASE:
        op_chase(id);
        break;
    case OP_FIRST_TOUCH:
        op_first_touch(id);
        break;
    case OP_PTE_UPDATE:
        op_pte_update(id);
        break;
    case OP_CR3_SWITCH:
        op_cr3_switch(id);
        break;
    default:
        vlab_fail(ARG(0), "paging: unknown operation");
    }
}
