/*
 * io.sriov: direct assignment of an SR-IOV virtual function through VFIO (type-1 IOMMU).
 *
 * The path QEMU takes for a VF, reduced to what the measurement needs: open the VFIO container
 * and the VF's IOMMU group, attach the group, pick the type-1 IOMMU, get the device fd, and
 *   - map one of the VF's BARs (VFIO_DEVICE_GET_REGION_INFO + mmap of the device fd) into the
 *     guest as a KVM memory slot, so guest loads and stores reach the device without a VM exit;
 *   - time VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA of guest memory page by page (what
 *     pinning and mapping guest RAM for device DMA costs).
 * Every ioctl failure names the ioctl. Hosts without VFIO never get here: io.sriov skips with
 * the reason vlab.host.sriov.detect gives.
 */
#include "internal.h"
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define VFIO_MAX_MAPS 8

_Static_assert(VLAB_VFIO_REGION_MMAP == VFIO_REGION_INFO_FLAG_MMAP, "vlab.h mirrors linux/vfio.h");

struct vlab_vfio {
    int container, group, device;
    int iommu_type;
    struct vfio_device_info info;
    struct { void *p; size_t len; } maps[VFIO_MAX_MAPS];
    int nr_maps;
};

void vlab_vfio_close(struct vlab_vfio *f)
{
    if (!f)
        return;
    for (int i = 0; i < f->nr_maps; i++)
        munmap(f->maps[i].p, f->maps[i].len);
    if (f->device >= 0)
        close(f->device);
    if (f->group >= 0)
        close(f->group);
    if (f->container >= 0)
        close(f->container);
    free(f);
}

int vlab_vfio_open(const char *container, const char *group, const char *bdf,
                   struct vlab_vfio **out)
{
    struct vfio_group_status gs = { .argsz = sizeof(gs) };
    struct vlab_vfio *f;
    int r;

    *out = NULL;
    f = calloc(1, sizeof(*f));
    if (!f)
        return vlab_fail(ENOMEM, "calloc", "vfio");
    f->container = f->group = f->device = -1;
    f->container = open(container, O_RDWR | O_CLOEXEC);
    if (f->container < 0) {
        r = vlab_fail_errno("open", "VFIO container %s", container);
        goto fail;
    }
    r = ioctl(f->container, VFIO_GET_API_VERSION);
    if (r != VFIO_API_VERSION) {
        r = r < 0 ? vlab_fail_errno("VFIO_GET_API_VERSION", NULL)
                  : vlab_fail(ENOTSUP, "VFIO_GET_API_VERSION", "API %d, vlab knows %d", r,
                              VFIO_API_VERSION);
        goto fail;
    }
    if (ioctl(f->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) > 0)
        f->iommu_type = VFIO_TYPE1v2_IOMMU;
    else if (ioctl(f->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) > 0)
        f->iommu_type = VFIO_TYPE1_IOMMU;
    else {
        r = vlab_fail(ENOTSUP, "VFIO_CHECK_EXTENSION", "no type-1 IOMMU support");
        goto fail;
    }
    f->group = open(group, O_RDWR | O_CLOEXEC);
    if (f->group < 0) {
        r = vlab_fail_errno("open", "VFIO group %s", group);
        goto fail;
    }
    if (ioctl(f->group, VFIO_GROUP_GET_STATUS, &gs) < 0) {
        r = vlab_fail_errno("VFIO_GROUP_GET_STATUS", "%s", group);
        goto fail;
    }
    if (!(gs.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        r = vlab_fail(EBUSY, "VFIO_GROUP_GET_STATUS", "group %s is not viable: every device in "
                      "it must be bound to vfio-pci", group);
        goto fail;
    }
    if (ioctl(f->group, VFIO_GROUP_SET_CONTAINER, &f->container) < 0) {
        r = vlab_fail_errno("VFIO_GROUP_SET_CONTAINER", "%s", group);
        goto fail;
    }
    if (ioctl(f->container, VFIO_SET_IOMMU, f->iommu_type) < 0) {
        r = vlab_fail_errno("VFIO_SET_IOMMU", "type %d", f->iommu_type);
        goto fail;
    }
    f->device = ioctl(f->group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (f->device < 0) {
        r = vlab_fail_errno("VFIO_GROUP_GET_DEVICE_FD", "%s", bdf);
        goto fail;
    }
    f->info.argsz = sizeof(f->info);
    if (ioctl(f->device, VFIO_DEVICE_GET_INFO, &f->info) < 0) {
        r = vlab_fail_errno("VFIO_DEVICE_GET_INFO", "%s", bdf);
        goto fail;
    }
    if (!(f->info.flags & VFIO_DEVICE_FLAGS_PCI)) {
        r = vlab_fail(ENOTSUP, "VFIO_DEVICE_GET_INFO", "%s is not a PCI device", bdf);
        goto fail;
    }
    *out = f;
    return 0;
fail:
    vlab_vfio_close(f);
    return r;
}

int vlab_vfio_region(struct vlab_vfio *f, uint32_t index, uint64_t *size, uint64_t *offset,
                     uint32_t *flags)
{
    struct vfio_region_info ri = { .argsz = sizeof(ri), .index = index };

    if (index >= f->info.num_regions)
        return vlab_fail(EINVAL, "VFIO_DEVICE_GET_REGION_INFO", "region %u of %u", index,
                         f->info.num_regions);
    if (ioctl(f->device, VFIO_DEVICE_GET_REGION_INFO, &ri) < 0)
        return vlab_fail_errno("VFIO_DEVICE_GET_REGION_INFO", "region %u", index);
    *size = ri.size;
    *offset = ri.offset;
    *flags = ri.flags;
    return 0;
}

/* mmap BAR `index` and make it guest memory at `gpa`: guest accesses then never exit. */
int vlab_vfio_map_bar(struct vlab_vfio *f, struct vlab_vm *vm, uint32_t index, uint64_t gpa,
                      uint64_t *size_out)
{
    uint64_t size, offset;
    uint32_t flags;
    struct vlab_slot *slot;
    void *p;
    int r;

    if (index > VFIO_PCI_BAR5_REGION_INDEX)
        return vlab_fail(EINVAL, "vlab_vfio_map_bar", "region %u is not a BAR", index);
    r = vlab_vfio_region(f, index, &size, &offset, &flags);
    if (r)
        return r;
    if (!size || !(flags & VFIO_REGION_INFO_FLAG_MMAP))
        return vlab_fail(ENOTSUP, "VFIO_DEVICE_GET_REGION_INFO", "BAR %u (%llu bytes) cannot be "
                         "mmapped", index, (unsigned long long)size);
    if (size % VLAB_PAGE)
        return vlab_fail(ENOTSUP, "vlab_vfio_map_bar", "BAR %u is %llu bytes, not whole pages",
                         index, (unsigned long long)size);
    if (f->nr_maps >= VFIO_MAX_MAPS)
        return vlab_fail(ENOSPC, "vlab_vfio_map_bar", "too many BAR mappings");
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, f->device, (off_t)offset);
    if (p == MAP_FAILED)
        return vlab_fail_errno("mmap", "BAR %u of the VF (%llu bytes)", index,
                               (unsigned long long)size);
    r = vlab_vm_slot_add_hva(vm, gpa, size, p, 0, &slot);
    if (r) {
        munmap(p, size);
        return r;
    }
    f->maps[f->nr_maps].p = p;
    f->maps[f->nr_maps].len = size;
    f->nr_maps++;
    *size_out = size;
    return 0;
}

/* Map `pages` pages of [hva, ...) at iova one page per VFIO_IOMMU_MAP_DMA, then unmap them. */
int vlab_vfio_dma_map_cost(struct vlab_vfio *f, void *hva, uint64_t iova, uint64_t pages,
                           uint64_t *map_ns, uint64_t *unmap_ns)
{
    uint64_t t0, done = 0;
    int r = 0;

    t0 = vlab_now_ns();
    for (; done < pages; done++) {
        struct vfio_iommu_type1_dma_map m = {
            .argsz = sizeof(m), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            .vaddr = (uintptr_t)hva + done * VLAB_PAGE, .iova = iova + done * VLAB_PAGE,
            .size = VLAB_PAGE,
        };

        if (ioctl(f->container, VFIO_IOMMU_MAP_DMA, &m) < 0) {
            r = vlab_fail_errno("VFIO_IOMMU_MAP_DMA", "page %llu at iova %#llx",
                                (unsigned long long)done, (unsigned long long)m.iova);
            break;
        }
    }
    *map_ns = vlab_now_ns() - t0;
    t0 = vlab_now_ns();
    for (uint64_t i = 0; i < done; i++) {
        struct vfio_iommu_type1_dma_unmap u = {
            .argsz = sizeof(u), .iova = iova + i * VLAB_PAGE, .size = VLAB_PAGE,
        };

        if (ioctl(f->container, VFIO_IOMMU_UNMAP_DMA, &u) < 0 && !r)
            r = vlab_fail_errno("VFIO_IOMMU_UNMAP_DMA", "iova %#llx", (unsigned long long)u.iova);
    }
    *unmap_ns = vlab_now_ns() - t0;
    return r;
}
