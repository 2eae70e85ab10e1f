/*
 * userfaultfd, for post-copy migration: open and negotiate, register guest memory for
 * missing-page faults, read the faults, and resolve them (UFFDIO_COPY, UFFDIO_WAKE).
 */
#include "internal.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

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
