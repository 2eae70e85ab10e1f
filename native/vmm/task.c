/*
 * CPU time and run-queue wait of one thread of this process, for the io area's measurements
 * (io.c's transfer threads, virtio.c's backend thread).
 *
 * CPU time per thread comes from /proc/self/task/<tid>/schedstat (on-CPU ns), falling back to
 * the utime+stime clock ticks of /proc/self/task/<tid>/stat; a thread measuring itself reads its
 * CPU-time clock (the same counter, up to date rather than as of the last scheduler tick).
 */
#include "internal.h"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int64_t vlab_task_cpu_ns(int32_t tid)
{
    char path[64], buf[1024];
    unsigned long long ns, ut, st;
    struct timespec ts;
    ssize_t n;
    int fd;

    /* A running thread's schedstat lags by up to a scheduler tick; its own CPU-time clock is the
     * same counter brought up to date, so a thread asking about itself reads that. */
    if (tid == (int32_t)syscall(SYS_gettid) && !clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;

    snprintf(path, sizeof(path), "/proc/self/task/%d/schedstat", tid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n > 0) {
            buf[n] = 0;
            if (sscanf(buf, "%llu", &ns) == 1)
                return (int64_t)ns;
        }
    }
    snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vlab_fail_errno("open", "%s", path);
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return vlab_fail_errno("read", "%s", path);
    buf[n] = 0;
    {
        /* fields after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
         * cmajflt utime stime */
        char *p = strrchr(buf, ')');

        if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                         &ut, &st) != 2)
            return vlab_fail(EINVAL, "read", "cannot parse %s", path);
    }
    return (int64_t)((ut + st) * (1000000000ULL / (unsigned long long)sysconf(_SC_CLK_TCK)));
}

/* ns thread `tid` spent runnable but waiting for a CPU (schedstat's second field): how much
 * other load on the host got in the way of a measurement. Accurate for a thread asking about
 * itself (its waits are accounted when it gets a CPU), or for one that is asleep. */
int64_t vlab_task_wait_ns(int32_t tid)
{
    char path[64], buf[256];
    unsigned long long run, wait;
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/self/task/%d/schedstat", tid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vlab_fail_errno("open", "%s", path);
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return vlab_fail_errno("read", "%s", path);
    buf[n] = 0;
    if (sscanf(buf, "%llu %llu", &run, &wait) != 2)
        return vlab_fail(EINVAL, "read", "cannot parse %s", path);
    return (int64_t)wait;
}
