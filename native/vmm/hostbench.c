/* Host-side reference loops, timed in C so nothing but the operation is measured. */
#include "internal.h"
#include <sys/syscall.h>
#include <unistd.h>

/* n getppid() system calls; total TSC cycles and ns. */
int vlab_host_syscall_loop(uint64_t n, uint64_t *cycles, uint64_t *ns)
{
    uint64_t t0 = vlab_now_ns(), c0 = vlab_rdtsc();

    for (uint64_t i = 0; i < n; i++)
        syscall(SYS_getppid);
    *cycles = vlab_rdtsc() - c0;
    *ns = vlab_now_ns() - t0;
    return 0;
}
