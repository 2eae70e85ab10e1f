/* The /dev/kvm handle: API version, capabilities, supported CPUID. */
#include "internal.h"
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define CAP(x) { #x, KVM_CAP_##x }
static const struct { const char *name; int nr; } caps[] = {
    CAP(IRQCHIP), CAP(HLT), CAP(USER_MEMORY), CAP(SET_TSS_ADDR), CAP(EXT_CPUID),
    CAP(NR_VCPUS), CAP(NR_MEMSLOTS), CAP(SYNC_MMU), CAP(IOEVENTFD), CAP(IRQFD),
    CAP(MAX_VCPUS), CAP(TSC_CONTROL), CAP(GET_TSC_KHZ), CAP(READONLY_MEM), CAP(IMMEDIATE_EXIT),
    CAP(X86_USER_SPACE_MSR), CAP(X86_MSR_FILTER), CAP(DIRTY_LOG_RING),
    CAP(DIRTY_LOG_RING_ACQ_REL), CAP(MANUAL_DIRTY_LOG_PROTECT2), CAP(BINARY_STATS_FD),
    CAP(EXIT_HYPERCALL), CAP(SYNC_REGS), CAP(XSAVE), CAP(XCRS), CAP(VCPU_EVENTS),
    CAP(ADJUST_CLOCK), CAP(X86_ROBUST_SINGLESTEP), CAP(NESTED_STATE), CAP(HYPERV),
    CAP(SPLIT_IRQCHIP), CAP(PMU_EVENT_FILTER), CAP(VM_TSC_CONTROL), CAP(USER_NMI),
    CAP(X86_DISABLE_EXITS), CAP(HALT_POLL), CAP(MAX_VCPU_ID), CAP(ENFORCE_PV_FEATURE_CPUID),
    CAP(SET_GUEST_DEBUG), CAP(COALESCED_MMIO), CAP(COALESCED_PIO), CAP(IOEVENTFD_ANY_LENGTH),
    CAP(MULTI_ADDRESS_SPACE), CAP(X86_TRIPLE_FAULT_EVENT), CAP(X86_NOTIFY_VMEXIT),
    CAP(IRQ_ROUTING), CAP(SIGNAL_MSI), CAP(TSC_DEADLINE_TIMER), CAP(X2APIC_API),

};

int vlab_kvm_cap_number(const char *name)
{
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++)
        if (!strcmp(caps[i].name, name))
            return caps[i].nr;
    return -1;
}

const char *vlab_kvm_cap_name(int index)
{
    if (index < 0 || (size_t)index >= sizeof(caps) / sizeof(caps[0]))
        return NULL;
    return caps[index].name;
}

int vlab_kvm_open(const char *path, struct vlab_kvm **out)
{
    struct vlab_kvm *kvm;
    int fd, r;

    *out = NULL;
    fd = open(path ? path : "/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return vlab_fail_errno("open", "%s", path ? path : "/dev/kvm");
    r = ioctl(fd, KVM_GET_API_VERSION, 0);
    if (r < 0) {
        r = vlab_fail_errno("KVM_GET_API_VERSION", NULL);
        close(fd);
        return r;
    }
    if (r != KVM_API_VERSION) {
        close(fd);
        return vlab_fail(ENOTSUP, "KVM_GET_API_VERSION", "API version %d, vlab needs %d", r,
                         KVM_API_VERSION);
    }
    kvm = calloc(1, sizeof(*kvm));
    if (!kvm) {
        close(fd);
        return vlab_fail(ENOMEM, "calloc", NULL);
    }
    kvm->fd = fd;
    kvm->api_version = r;
    kvm->run_size = ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (kvm->run_size < (int)sizeof(struct kvm_run)) {
        r = vlab_fail_errno("KVM_GET_VCPU_MMAP_SIZE", NULL);
        vlab_kvm_close(kvm);
        return r;
    }
    *out = kvm;
    return 0;
}

void vlab_kvm_close(struct vlab_kvm *kvm)
{
    if (!kvm)
        return;
    if (kvm->fd >= 0)
        close(kvm->fd);
    free(kvm->cpuid);
    free(kvm);
}

int vlab_kvm_fd(struct vlab_kvm *kvm) { return kvm->fd; }
int vlab_kvm_api_version(struct vlab_kvm *kvm) { return kvm->api_version; }

int vlab_kvm_check_cap(struct vlab_kvm *kvm, int cap)
{
    int r = ioctl(kvm->fd, KVM_CHECK_EXTENSION, cap);

    return r < 0 ? vlab_fail_errno("KVM_CHECK_EXTENSION", "cap %d", cap) : r;
}

/* Features KVM emulates for any guest but leaves out of KVM_GET_SUPPORTED_CPUID when the host
 * CPU lacks them, which a VMM turns on when KVM says so (api.rst, KVM_CAP_TSC_DEADLINE_TIMER;
 * QEMU does the same): the TSC-deadline timer of the in-kernel LAPIC (CPUID.01H:ECX[24]). Without
 * the bit KVM keeps the LVT timer out of TSC-deadline mode and ignores IA32_TSC_DEADLINE; the
 * SVM lane's TCG host (no TSC-deadline in QEMU's TCG CPU) showed it. */
static void kvm_add_emulated_features(struct vlab_kvm *kvm, struct kvm_cpuid2 *c)
{
    if (ioctl(kvm->fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER) <= 0)
        return;
    for (uint32_t i = 0; i < c->nent; i++)
        if (c->entries[i].function == 1)
            c->entries[i].ecx |= 1U << 24;
}

/* Fetch KVM_GET_SUPPORTED_CPUID once (plus the features KVM emulates, above), growing the
 * buffer until it fits (E2BIG). */
static int kvm_load_cpuid(struct vlab_kvm *kvm)
{
    int n = 64;

    if (kvm->cpuid)
        return 0;
    for (;;) {
        struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));

        if (!c)
            return vlab_fail(ENOMEM, "calloc", NULL);
        c->nent = n;
        if (ioctl(kvm->fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
            kvm_add_emulated_features(kvm, c);
            kvm->cpuid = c;
            return 0;
        }
        free(c);
        if (errno != E2BIG || n > 4096)
            return vlab_fail_errno("KVM_GET_SUPPORTED_CPUID", NULL);
        n *= 2;
    }
}

struct kvm_cpuid2 *vlab_kvm_cpuid(struct vlab_kvm *kvm)
{
    return kvm_load_cpuid(kvm) ? NULL : kvm->cpuid;
}

int vlab_kvm_supported_cpuid(struct vlab_kvm *kvm, uint32_t leaf, uint32_t index, uint32_t *regs4)
{
    int r = kvm_load_cpuid(kvm);

    if (r)
        return r;
    for (uint32_t i = 0; i < kvm->cpuid->nent; i++) {
        struct kvm_cpuid_entry2 *e = &kvm->cpuid->entries[i];

        if (e->function == leaf &&
            (!(e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e->index == index)) {
            regs4[0] = e->eax; regs4[1] = e->ebx; regs4[2] = e->ecx; regs4[3] = e->edx;
            return 1;
        }
    }
    return 0;
}
