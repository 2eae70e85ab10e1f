/*
 * exitbench: an independent, bare measurement of guest exit costs, with no Python or pyperf.
 *
 * It drives the same VMM C code and the same guest micro payload as `vlab run`, but sets the VM
 * up and reads the guest's rdtsc samples itself, so `exits.cpuid` and `exits.pio_user` can be
 * checked against it. Usage:
 *
 *     exitbench IMAGE OP ITERS SAMPLES [CPL]      OP: cpuid | out | nop
 *
 * Prints one JSON object: median guest cycles per operation (bracket and nop loop subtracted,
 * as vlab does), the median raw sample, and the host ns per operation over the whole run.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vlab.h"

#define SYS_SIZE (VLAB_GPA_PTPOOL + (8u << 20))
#define PORT 0x80

/* micro payload operations and argument slots (native/guest/payloads/micro.c) */
enum { OP_NOP = 0, OP_CPUID = 1, OP_OUT = 2, OP_EMPTY = 17 };
enum { P_MAGIC = 0, P_NR_VCPUS = 1, P_RESULTS_BASE = 2, P_RESULTS_STRIDE = 3, P_ARG0 = 16 };

struct bench {
    struct vlab_kvm *kvm;
    struct vlab_vm *vm;
    struct vlab_vcpu *vcpu;
    struct vlab_slot *sys;
    uint64_t cr3, entry;
    int cpl;
};

static int die(const char *what)
{
    const struct vlab_error *e = vlab_last_error();

    fprintf(stderr, "exitbench: %s: %s failed (errno %d) %s\n", what, e->op, e->err, e->msg);
    return 1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v, uint64_t n)
{
    qsort(v, n, sizeof(*v), cmp_u64);
    return n ? v[n / 2] : 0;
}

/* One guest run of `samples` samples of `iters` ops; returns samples in out[]. */
static int run_op(struct bench *b, int op, uint64_t iters, uint64_t samples, uint64_t *out,
                  uint64_t *ns)
{
    uint64_t *params = vlab_vm_gpa_to_hva(b->vm, VLAB_GPA_PARAMS, 4096);
    uint64_t *res = vlab_vm_gpa_to_hva(b->vm, VLAB_GPA_RESULTS, VLAB_RESULTS_SIZE);
    struct vlab_stop st;

    memset(params + P_ARG0, 0, 16 * 8);
    params[P_ARG0 + 0] = op;
    params[P_ARG0 + 1] = iters;
    params[P_ARG0 + 2] = samples;
    params[P_ARG0 + 3] = op == OP_CPUID ? 0 : PORT;
    res[0] = 0;
    res[1] = VLAB_RESULTS_SIZE / 8 - 2;
    if (vlab_vcpu_setup(b->vcpu, b->cpl, b->cr3, b->entry, VLAB_GPA_USTACKS + VLAB_USTACK_SIZE))
        return die("vcpu setup");
    if (vlab_vcpu_run(b->vcpu, 60000, &st))
        return die("KVM_RUN");
    if (st.reason != VLAB_STOP_DONE) {
        fprintf(stderr, "exitbench: guest stopped with reason %d: %s\n", st.reason, st.msg);
        return 1;
    }
    if (res[0] != samples) {
        fprintf(stderr, "exitbench: guest recorded %llu samples, expected %llu\n",
                (unsigned long long)res[0], (unsigned long long)samples);
        return 1;
    }
    memcpy(out, res + 2, samples * 8);
    if (ns)
        *ns = st.t_exit_ns - st.t_enter_ns;
    return 0;
}

int main(int argc, char **argv)
{
    struct bench b = { 0 };
    uint64_t iters, samples, *buf, bracket, nop, raw, ns;
    double per_op, nop_per_iter;
    int op, r;
    FILE *f;
    uint8_t *image;
    long size;

    if (argc < 5) {
        fprintf(stderr, "usage: exitbench IMAGE cpuid|out|nop ITERS SAMPLES [CPL]\n");
        return 2;
    }
    op = !strcmp(argv[2], "cpuid") ? OP_CPUID : !strcmp(argv[2], "out") ? OP_OUT :
         !strcmp(argv[2], "nop") ? OP_NOP : -1;
    iters = strtoull(argv[3], NULL, 0);
    samples = strtoull(argv[4], NULL, 0);
    b.cpl = argc > 5 ? atoi(argv[5]) : 3;
    if (op < 0 || !iters || !samples || samples > 100000) {
        fprintf(stderr, "exitbench: bad arguments\n");
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    rewind(f);
    image = malloc(size);
    buf = calloc(samples + 256, sizeof(*buf));
    if (!image || !buf || fread(image, 1, size, f) != (size_t)size) {
        fprintf(stderr, "exitbench: cannot read %s\n", argv[1]);
        return 2;
    }
    fclose(f);

    if (vlab_kvm_open(NULL, &b.kvm) || vlab_vm_create(b.kvm, &b.vm))
        return die("VM");
    if (vlab_vm_slot_add(b.vm, 0, SYS_SIZE, VLAB_BACKING_4K, 0, -1, &b.sys))
        return die("memory");
    if (vlab_vm_load_image(b.vm, image, size, NULL) ||
        vlab_vm_setup_tables(b.vm, VLAB_GPA_PTPOOL, SYS_SIZE - VLAB_GPA_PTPOOL) ||
        vlab_vm_as_create(b.vm, &b.cr3) ||
        vlab_vm_as_map(b.vm, b.cr3, 0x1000, 0x1000, SYS_SIZE - 0x1000, 4096,
                       VLAB_MAP_WRITE | VLAB_MAP_USER | VLAB_MAP_PRESET_AD))
        return die("guest layout");
    b.entry = ((struct vlab_image_header *)image)->entry;
    {
        uint64_t *params = vlab_vm_gpa_to_hva(b.vm, VLAB_GPA_PARAMS, 4096);

        params[P_MAGIC] = 0x564C4142504152ULL;
        params[P_NR_VCPUS] = 1;
        params[P_RESULTS_BASE] = VLAB_GPA_RESULTS;
        params[P_RESULTS_STRIDE] = VLAB_RESULTS_SIZE;
    }
    if (vlab_vcpu_create(b.vm, 0, &b.vcpu) || vlab_vm_add_pio_sink(b.vm, PORT, 1, 0) < 0)
        return die("vCPU");

    /* calibrate exactly as vlab does: empty bracket, then the nop loop at this CPL */
    if ((r = run_op(&b, OP_EMPTY, 0, 64, buf, NULL)) != 0)
        return r;
    bracket = median(buf, 64);
    {
        uint64_t nop_iters = b.cpl == 3 ? 2000 : 20;

        if ((r = run_op(&b, OP_NOP, nop_iters, 32, buf, NULL)) != 0)
            return r;
        nop_per_iter = ((double)median(buf, 32) - (double)bracket) / nop_iters;
    }
    if ((r = run_op(&b, op, iters, samples, buf, &ns)) != 0)
        return r;
    raw = median(buf, samples);
    per_op = ((double)raw - (double)bracket) / iters - (op == OP_NOP ? 0 : nop_per_iter);
    nop = (uint64_t)nop_per_iter;
    (void)nop;
    printf("{\"op\": \"%s\", \"cpl\": %d, \"iters\": %llu, \"samples\": %llu, "
           "\"guest_cycles\": %.1f, \"raw_sample_cycles\": %llu, \"bracket_cycles\": %llu, "
           "\"nop_cycles_per_iter\": %.3f, \"host_ns_per_op_mean\": %.1f, \"sink_hits\": %llu}\n",
           argv[2], b.cpl, (unsigned long long)iters, (unsigned long long)samples, per_op,
           (unsigned long long)raw, (unsigned long long)bracket, nop_per_iter,
           (double)ns / (double)(iters * samples), (unsigned long long)vlab_vm_sink_hits(b.vm, 0));
    vlab_vm_destroy(b.vm);
    vlab_kvm_close(b.kvm);
    free(image);
    free(buf);
    return 0;
}
