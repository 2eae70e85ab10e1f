/*
 * Interrupts into the guest: KVM's in-kernel irqchip (PIC, IOAPIC and one local APIC per vCPU),
 * MSI routes, irqfds, KVM_SIGNAL_MSI, and the local APIC's register page (KVM_GET_LAPIC).
 *
 * Stateless: the VM's MSI routing table is kept by the caller (vlab.vmm.vm.Vm) and handed over
 * whole, because KVM_SET_GSI_ROUTING replaces the table. Every route is validated here as well
 * as in Python: a fixed-delivery vector below 32 would be an exception vector (0-15 are illegal
 * for the APIC, 16-31 reserved), and a destination must be a physical APIC ID the VM can have.
 *
 * MSI address/data (Intel SDM Vol. 3A, 11.11 "Message Signalled Interrupts"): address
 * 0xFEE00000 | destination ID << 12 (physical mode, no redirection hint); data = vector, fixed
 * delivery mode (0 << 8), edge triggered.
 */
#include "internal.h"
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSI_ADDR_BASE 0xFEE00000U

int vlab_irq_chip_create(struct vlab_vm *vm)
{
    if (ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0)
        return vlab_fail_errno("KVM_CREATE_IRQCHIP", NULL);
    return 0;
}

static int msi_check(const char *op, uint32_t dest, uint32_t vector)
{
    if (vector < 32 || vector > 255)
        return vlab_fail(EINVAL, op, "vector %u is not an interrupt vector (32-255)", vector);
    if (dest >= VLAB_MAX_VCPUS)
        return vlab_fail(EINVAL, op, "destination APIC ID %u: a VM has at most %d vCPUs",
                         dest, VLAB_MAX_VCPUS);
    return 0;
}

int vlab_irq_set_msi_routes(struct vlab_vm *vm, uint32_t n, const uint32_t *gsi,
                            const uint32_t *dest, const uint32_t *vector)
{
    struct kvm_irq_routing *t;
    int r;

    if (n > 4096)
        return vlab_fail(EINVAL, "KVM_SET_GSI_ROUTING", "%u routes: KVM allows at most 4096", n);
    for (uint32_t i = 0; i < n; i++) {
        if ((r = msi_check("KVM_SET_GSI_ROUTING", dest[i], vector[i])))
            return r;
        if (gsi[i] >= 4096)
            return vlab_fail(EINVAL, "KVM_SET_GSI_ROUTING", "GSI %u out of range", gsi[i]);
    }
    t = calloc(1, sizeof(*t) + n * sizeof(t->entries[0]));
    if (!t)
        return vlab_fail(ENOMEM, "KVM_SET_GSI_ROUTING", "routing table");
    t->nr = n;
    for (uint32_t i = 0; i < n; i++) {
        t->entries[i].gsi = gsi[i];
        t->entries[i].type = KVM_IRQ_ROUTING_MSI;
        t->entries[i].u.msi.address_lo = MSI_ADDR_BASE | (dest[i] << 12);
        t->entries[i].u.msi.address_hi = 0;
        t->entries[i].u.msi.data = vector[i];
    }
    r = ioctl(vm->fd, KVM_SET_GSI_ROUTING, t);
    free(t);
    if (r < 0)
        return vlab_fail_errno("KVM_SET_GSI_ROUTING", "%u MSI routes", n);
    return 0;
}

int vlab_irq_irqfd(struct vlab_vm *vm, int fd, uint32_t gsi, int assign)
{
    struct kvm_irqfd a;

    memset(&a, 0, sizeof(a));
    a.fd = (uint32_t)fd;
    a.gsi = gsi;
    a.flags = assign ? 0 : KVM_IRQFD_FLAG_DEASSIGN;
    if (ioctl(vm->fd, KVM_IRQFD, &a) < 0)
        return vlab_fail_errno("KVM_IRQFD", "%s fd %d on GSI %u", assign ? "assign" : "deassign",
                               fd, gsi);
    return 0;
}

int vlab_irq_signal_msi(struct vlab_vm *vm, uint32_t dest, uint32_t vector)
{
    struct kvm_msi m;
    int r;

    if ((r = msi_check("KVM_SIGNAL_MSI", dest, vector)))
        return r;
    memset(&m, 0, sizeof(m));
    m.address_lo = MSI_ADDR_BASE | (dest << 12);
    m.data = vector;
    r = ioctl(vm->fd, KVM_SIGNAL_MSI, &m);
    if (r < 0)
        return vlab_fail_errno("KVM_SIGNAL_MSI", "vector %u to APIC ID %u", vector, dest);
    return r;           /* > 0 delivered, 0 blocked by the guest */
}

int vlab_irq_fire(int fd, uint64_t *tsc)
{
    uint64_t one = 1;
    ssize_t w;

    *tsc = vlab_rdtsc();
    w = write(fd, &one, sizeof(one));
    if (w != (ssize_t)sizeof(one))
        return vlab_fail_errno("write", "irqfd %d", fd);
    return 0;
}

int vlab_irq_lapic_get(struct vlab_vcpu *vcpu, uint8_t *regs1024)
{
    struct kvm_lapic_state s;

    if (ioctl(vlab_vcpu_fd(vcpu), KVM_GET_LAPIC, &s) < 0)
        return vlab_fail_errno("KVM_GET_LAPIC", NULL);
    memcpy(regs1024, s.regs, sizeof(s.regs));
    return 0;
}
