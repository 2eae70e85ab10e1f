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

/* Read /proc/self/task/<tid>/<name> into buf as a string (path says which file). -1 with errno
 * set and *op naming the failed call ("open" or "read"), without recording an error: callers
 * that have a fallback try it, the others report *op and errno. */
static int read_task_file(int32_t tid, const char *name, char *path, size_t path_size,
                          char *buf, size_t size, const char **op)
{
    ssize_t n;
    int fd;

    snprintf(path, path_size, "/proc/self/task/%d/%s", tid, name);
    *op = "open";
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    *op = "read";
    n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return 0;
}

int64_t vlab_task_cpu_ns(int32_t tid)
{
    char path[64], buf[1024];
    unsigned long long ns, ut, st;
    struct timespec ts;
    const char *op;

    /* A running thread's schedstat lags by up to a scheduler tick; its own CPU-time clock is the
     * same counter brought up to date, so a thread asking about itself reads that. */
    if (tid == (int32_t)syscall(SYS_gettid) && !clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;

    if (!read_task_file(tid, "schedstat", path, sizeof(path), buf, sizeof(buf), &op) &&
        sscanf(buf, "%llu", &ns) == 1)
        return (int64_t)ns;
    if (read_task_file(tid, "stat", path, sizeof(path), buf, sizeof(buf), &op))
        return vlab_fail_errno(op, "%s", path);
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
    const char *op;

    if (read_task_file(tid, "schedstat", path, sizeof(path), buf, sizeof(buf), &op))
        return vlab_fail_errno(op, "%s", path);
    if (sscanf(buf, "%llu %llu", &run, &wait) != 2)
        return vlab_fail(EINVAL, "read", "cannot parse %s", path);
    return (int64_t)wait;
}
