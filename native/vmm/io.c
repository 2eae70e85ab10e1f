/*
 * io area, host side: the two host baselines that io.ivshmem and io.virtio are compared with:
 * the same SPSC ring between two host threads (io.native_ring, vlab_xfer_native_ring, and the
 * ring's own cost, vlab_ring_*) and a TCP connection over 127.0.0.1 (io.tcp_loopback), plus
 * the cost of one copy (vlab_copy_cost). Each thread's CPU time comes from task.c.
 */
#include "internal.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

struct host_ctx;
static int host_aborted(struct host_ctx *c);
#define VLAB_SPSC_ABORTED(ctx) host_aborted(ctx)
#include "vlab_spsc.h"

static int32_t my_tid(void) { return (int32_t)syscall(SYS_gettid); }

/* ---------------- host runs: shared context, abort, timing ---------------- */

struct host_ctx {
    struct vlab_xfer *x;
    _Atomic int abort;
    int err;                        /* first error (errno) */
    char what[160];
    uint64_t deadline_ns;
    _Atomic int go;
    uint64_t *samples;
    uint64_t cap;
    uint8_t *mem;                   /* rings (native) */
    size_t mem_len;
    int fd[2];                      /* sockets (tcp): client, server side */
    uint32_t spins;
};

static int host_aborted(struct host_ctx *c)
{
    if (atomic_load_explicit(&c->abort, memory_order_relaxed))
        return 1;
    if (++c->spins % 4096)
        return 0;
    if (vlab_now_ns() > c->deadline_ns) {
        atomic_store(&c->abort, 1);
        return 1;
    }
    return 0;
}

static void host_fail(struct host_ctx *c, int err, const char *what)
{
    int expected = 0;

    if (atomic_compare_exchange_strong(&c->abort, &expected, 2)) {
        c->err = err;
        snprintf(c->what, sizeof(c->what), "%s", what);
    }
    atomic_store(&c->abort, 1);
    if (c->fd[0] >= 0)
        shutdown(c->fd[0], SHUT_RDWR);
    if (c->fd[1] >= 0)
        shutdown(c->fd[1], SHUT_RDWR);
}

static uint64_t total_msgs(const struct vlab_xfer *x)
{
    return (x->warm_chunks + x->chunks) * x->chunk_msgs;
}

static int xfer_check(struct vlab_xfer *x, uint64_t cap, const char *op)
{
    uint64_t need = x->echo ? x->chunks * x->chunk_msgs : x->chunks + 1;

    if (x->msg_bytes < VLAB_MSG_MIN || x->msg_bytes > VLAB_MSG_MAX)
        return vlab_fail(EINVAL, op, "msg_bytes %u not in %u..%u", x->msg_bytes, VLAB_MSG_MIN,
                         VLAB_MSG_MAX);
    if (!x->chunk_msgs || !x->chunks || !x->batch)
        return vlab_fail(EINVAL, op, "chunk_msgs, chunks and batch must be positive");
    if (cap < need)
        return vlab_fail(EINVAL, op, "sample buffer holds %llu, need %llu",
                         (unsigned long long)cap, (unsigned long long)need);
    if (!x->timeout_ms)
        x->timeout_ms = 10000;
    x->received = x->bytes = x->seq_errors = x->len_errors = x->sum_errors = 0;
    x->tx_cpu_ns = x->rx_cpu_ns = x->wall_ns = x->tx_wait_ns = x->rx_wait_ns = 0;
    x->kicks = x->waits = x->full_spins = x->empty_spins = 0;
    return 0;
}

static void collect_rx(struct vlab_xfer *x, const struct vlab_spsc_end *e)
{
    x->received += e->received;
    x->bytes += e->bytes;
    x->seq_errors += e->seq_errors;
    x->len_errors += e->len_errors;
    x->sum_errors += e->sum_errors;
    x->waits += e->waits;
    x->empty_spins += e->empty_spins;
}

/* Run tx(c) and rx(c) on two fresh threads released together; record their CPU time. */
struct role {
    struct host_ctx *c;
    void (*fn)(struct host_ctx *c);
    int tx;
};

static void *role_main(void *arg)
{
    struct role *r = arg;
    struct vlab_xfer *x = r->c->x;
    int32_t tid = my_tid();
    int64_t c0, c1, w0, w1;
    uint64_t mask = r->tx ? x->tx_cpus : x->rx_cpus;

    if (mask) {                     /* pinned before the run starts (vlab.vmm.thread) */
        cpu_set_t set;

        CPU_ZERO(&set);
        for (int i = 0; i < 64; i++)
            if (mask >> i & 1)
                CPU_SET(i, &set);
        if (sched_setaffinity(0, sizeof(set), &set))
            host_fail(r->c, errno, "sched_setaffinity of a host thread failed");
    }
    while (!atomic_load(&r->c->go))
        sched_yield();
    c0 = vlab_task_cpu_ns(tid);
    w0 = vlab_task_wait_ns(tid);
    if (!atomic_load(&r->c->abort))
        r->fn(r->c);
    c1 = vlab_task_cpu_ns(tid);
    w1 = vlab_task_wait_ns(tid);
    if (r->tx) {
        x->tx_tid = tid;
        x->tx_cpu_ns = c1 >= c0 && c0 >= 0 ? (uint64_t)(c1 - c0) : 0;
        x->tx_wait_ns = w1 >= w0 && w0 >= 0 ? (uint64_t)(w1 - w0) : 0;
    } else {
        x->rx_tid = tid;
        x->rx_cpu_ns = c1 >= c0 && c0 >= 0 ? (uint64_t)(c1 - c0) : 0;
        x->rx_wait_ns = w1 >= w0 && w0 >= 0 ? (uint64_t)(w1 - w0) : 0;
    }
    return NULL;
}

static int run_pair(struct host_ctx *c, void (*tx)(struct host_ctx *), void (*rx)(struct host_ctx *),
                    const char *op)
{
    struct role rt = { c, tx, 1 }, rr = { c, rx, 0 };
    pthread_t t1, t2;
    uint64_t t0;
    int r;

    c->deadline_ns = vlab_now_ns() + c->x->timeout_ms * 1000000ULL;
    r = pthread_create(&t1, NULL, role_main, &rr);
    if (r)
        return vlab_fail(r, "pthread_create", "%s consumer", op);
    r = pthread_create(&t2, NULL, role_main, &rt);
    if (r) {
        host_fail(c, r, "pthread_create failed");
        atomic_store(&c->go, 1);
        pthread_join(t1, NULL);
        return vlab_fail(r, "pthread_create", "%s producer", op);
    }
    t0 = vlab_now_ns();
    atomic_store(&c->go, 1);
    pthread_join(t2, NULL);
    pthread_join(t1, NULL);
    c->x->wall_ns = vlab_now_ns() - t0;
    if (atomic_load(&c->abort)) {
        if (!c->err)
            return vlab_fail(ETIMEDOUT, op, "did not finish within %llu ms",
                             (unsigned long long)c->x->timeout_ms);
        return vlab_fail(c->err, op, "%s", c->what);
    }
    return 0;
}

/* ---------------- io.native_ring: the SPSC ring between two host threads ---------------- */

static void ring_tx_stream(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    struct vlab_spsc_end e;
    uint8_t *src = malloc(x->msg_bytes);
    uint64_t r;

    if (!src || vlab_spsc_attach(&e, c->mem, c->mem_len / 2, x->msg_bytes, 1)) {
        host_fail(c, src ? EPROTO : ENOMEM, "producer cannot attach to the ring");
        free(src);
        return;
    }
    memset(src, 0x5a, x->msg_bytes);
    r = vlab_spsc_send(&e, total_msgs(x), src, x->msg_bytes, x->batch, x->flags, c);
    if (r == VLAB_SPSC_CORRUPT)
        host_fail(c, EPROTO, "consumer index corrupt");
    x->kicks = e.kicks;
    x->full_spins = e.full_spins;
    free(src);
}

static void ring_rx_stream(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    struct vlab_spsc_end e;
    uint8_t *sink = malloc(x->msg_bytes);
    uint64_t r;

    if (!sink || vlab_spsc_attach(&e, c->mem, c->mem_len / 2, x->msg_bytes, 0)) {
        host_fail(c, sink ? EPROTO : ENOMEM, "consumer cannot attach to the ring");
        free(sink);
        return;
    }
    r = vlab_spsc_consume(&e, sink, x->msg_bytes, x->warm_chunks, x->chunks, x->chunk_msgs,
                          x->flags, c, c->samples);
    if (r == VLAB_SPSC_CORRUPT)
        host_fail(c, EPROTO, "producer index corrupt");
    collect_rx(x, &e);
    free(sink);
}

/* echo: ping ring (first half of mem) carries requests, pong ring (second half) the replies */
static void ring_tx_echo(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    struct vlab_spsc_end ping, pong;
    size_t half = c->mem_len / 2;
    uint8_t *src = malloc(x->msg_bytes), *sink = malloc(x->msg_bytes);
    uint64_t n = total_msgs(x), warm = x->warm_chunks * x->chunk_msgs;

    if (!src || !sink || vlab_spsc_attach(&ping, c->mem, half, x->msg_bytes, 1) ||
        vlab_spsc_attach(&pong, c->mem + half, half, x->msg_bytes, 0)) {
        host_fail(c, EPROTO, "client cannot attach to the rings");
        goto out;
    }
    memset(src, 0x5a, x->msg_bytes);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = vlab_tsc(), t1;

        if (vlab_spsc_send(&ping, 1, src, x->msg_bytes, 1, x->flags, c) ||
            vlab_spsc_recv(&pong, sink, x->msg_bytes, x->flags, c)) {
            host_fail(c, EPROTO, "echo client: ring corrupt or aborted");
            break;
        }
        t1 = vlab_tsc();
        if (i >= warm)
            c->samples[i - warm] = t1 - t0;
    }
    vlab_spsc_release(&pong);
    collect_rx(x, &pong);
    x->kicks = ping.kicks;
out:
    free(src);
    free(sink);
}

static void ring_rx_echo(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    struct vlab_spsc_end ping, pong;
    size_t half = c->mem_len / 2;
    uint8_t *sink = malloc(x->msg_bytes);
    uint64_t n = total_msgs(x);

    if (!sink || vlab_spsc_attach(&ping, c->mem, half, x->msg_bytes, 0) ||
        vlab_spsc_attach(&pong, c->mem + half, half, x->msg_bytes, 1)) {
        host_fail(c, EPROTO, "server cannot attach to the rings");
        free(sink);
        return;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (vlab_spsc_recv(&ping, sink, x->msg_bytes, x->flags, c) ||
            vlab_spsc_send(&pong, 1, sink, x->msg_bytes, 1, x->flags | VLAB_XFER_F_RAW, c)) {
            host_fail(c, EPROTO, "echo server: ring corrupt or aborted");
            break;
        }
    }
    vlab_spsc_release(&ping);
    /* the server checks the requests too; the client counts what arrived back */
    x->seq_errors += ping.seq_errors;
    x->len_errors += ping.len_errors;
    x->sum_errors += ping.sum_errors;
    free(sink);
}

int64_t vlab_ring_bytes(uint32_t msg_bytes)
{
    uint64_t slots, sb;

    vlab_spsc_geometry(msg_bytes, &slots, &sb);
    return (int64_t)vlab_spsc_bytes(slots, sb);
}

int64_t vlab_ring_setup(void *mem, uint64_t size, uint32_t msg_bytes)
{
    uint64_t slots, sb;

    if (msg_bytes < VLAB_MSG_MIN || msg_bytes > VLAB_MSG_MAX)
        return vlab_fail(EINVAL, "vlab_ring_setup", "msg_bytes %u not in %u..%u", msg_bytes,
                         VLAB_MSG_MIN, VLAB_MSG_MAX);
    vlab_spsc_geometry(msg_bytes, &slots, &sb);
    if (size < vlab_spsc_bytes(slots, sb))
        return vlab_fail(EINVAL, "vlab_ring_setup", "%llu bytes cannot hold a ring of %llu x %llu",
                         (unsigned long long)size, (unsigned long long)slots,
                         (unsigned long long)sb);
    vlab_spsc_init(mem, slots, sb);
    return (int64_t)vlab_spsc_bytes(slots, sb);
}

/* The ring's own cost per message on one host thread (see vlab_spsc_solo): `chunks` samples
 * of TSC cycles, each `rounds` ring-fulls. Returns the ring's slot count. */
int vlab_ring_solo(uint32_t msg_bytes, uint32_t batch, uint64_t rounds, uint64_t chunks,
                   uint64_t *samples)
{
    struct vlab_spsc_end p, c;
    struct host_ctx hc;
    int64_t one = vlab_ring_bytes(msg_bytes);
    uint8_t *mem, *src = malloc(msg_bytes), *sink = malloc(msg_bytes);
    int r = 0;

    memset(&hc, 0, sizeof(hc));
    hc.deadline_ns = ~0ULL;
    mem = mmap(NULL, (size_t)one, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED || !src || !sink) {
        r = vlab_fail(ENOMEM, "vlab_ring_solo", "buffers");
        goto out;
    }
    vlab_ring_setup(mem, (uint64_t)one, msg_bytes);
    memset(src, 0x5a, msg_bytes);
    if (vlab_spsc_attach(&p, mem, (uint64_t)one, msg_bytes, 1) ||
        vlab_spsc_attach(&c, mem, (uint64_t)one, msg_bytes, 0)) {
        r = vlab_fail(EPROTO, "vlab_ring_solo", "attach");
        goto out;
    }
    for (uint64_t i = 0; i < chunks; i++) {
        uint64_t rounds_done = 0, t0 = vlab_tsc();

        for (; rounds_done < rounds; rounds_done++) {
            if (vlab_spsc_send(&p, p.slots, src, msg_bytes, batch, 0, &hc))
                break;
            for (uint64_t k = 0; k < c.slots; k++)
                if (vlab_spsc_recv(&c, sink, msg_bytes, 0, &hc))
                    break;
            vlab_spsc_release(&c);
            p.other = c.pos;
        }
        samples[i] = vlab_tsc() - t0;
    }
    r = (int)p.slots;
out:
    if (mem != MAP_FAILED)
        munmap(mem, (size_t)one);
    free(src);
    free(sink);
    return r;
}

int vlab_xfer_native_ring(struct vlab_xfer *x, uint64_t *samples, uint64_t cap)
{
    struct host_ctx c;
    int64_t one;
    int r;

    r = xfer_check(x, cap, "vlab_xfer_native_ring");
    if (r)
        return r;
    memset(&c, 0, sizeof(c));
    c.x = x;
    c.samples = samples;
    c.cap = cap;
    c.fd[0] = c.fd[1] = -1;
    one = (vlab_ring_bytes(x->msg_bytes) + 4095) & ~4095LL;
    c.mem_len = 2 * (size_t)one;
    c.mem = mmap(NULL, c.mem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                 -1, 0);
    if (c.mem == MAP_FAILED)
        return vlab_fail_errno("mmap", "native ring");
    vlab_ring_setup(c.mem, one, x->msg_bytes);
    vlab_ring_setup(c.mem + one, one, x->msg_bytes);
    x->flags &= ~VLAB_XFER_F_DOORBELL;     /* host threads poll: the physical limit */
    if (x->echo)
        r = run_pair(&c, ring_tx_echo, ring_rx_echo, "vlab_xfer_native_ring");
    else
        r = run_pair(&c, ring_tx_stream, ring_rx_stream, "vlab_xfer_native_ring");
    munmap(c.mem, c.mem_len);
    return r;
}

/* ---------------- io.tcp_loopback: TCP over 127.0.0.1 between two threads ---------------- */

/* The whole run is bounded too, not only each call (SO_SNDTIMEO/SO_RCVTIMEO). */
static int past_deadline(struct host_ctx *c)
{
    if (vlab_now_ns() <= c->deadline_ns)
        return 0;
    host_fail(c, ETIMEDOUT, "loopback transfer did not finish in time");
    return 1;
}

static int send_all(struct host_ctx *c, int fd, const uint8_t *p, size_t n)
{
    if (past_deadline(c))
        return -1;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);

        if (k < 0) {
            if (errno == EINTR)
                continue;
            host_fail(c, errno == EAGAIN ? ETIMEDOUT : errno, "send() on the loopback socket");
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int recv_all(struct host_ctx *c, int fd, uint8_t *p, size_t n)
{
    if (past_deadline(c))
        return -1;
    while (n) {
        ssize_t k = recv(fd, p, n, MSG_WAITALL);

        if (k < 0) {
            if (errno == EINTR)
                continue;
            host_fail(c, errno == EAGAIN ? ETIMEDOUT : errno, "recv() on the loopback socket");
            return -1;
        }
        if (k == 0) {
            host_fail(c, ECONNRESET, "peer closed the loopback connection");
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void tcp_tx_stream(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    uint8_t *src = malloc(x->msg_bytes);
    uint64_t n = total_msgs(x), seq = 0;

    if (!src) {
        host_fail(c, ENOMEM, "malloc");
        return;
    }
    memset(src, 0x5a, x->msg_bytes);
    for (uint64_t i = 0; i < n && !atomic_load_explicit(&c->abort, memory_order_relaxed); i++) {
        if ((x->flags & VLAB_XFER_F_BAD_SEQ) && seq == 5)
            seq++;
        vlab_msg_build(src, x->msg_bytes, seq++, x->flags);
        if (send_all(c, c->fd[0], src, x->msg_bytes))
            break;
    }
    free(src);
}

static void tcp_rx_stream(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    struct vlab_spsc_end e;
    uint8_t *sink = malloc(x->msg_bytes);

    memset(&e, 0, sizeof(e));
    if (!sink) {
        host_fail(c, ENOMEM, "malloc");
        return;
    }
    for (uint64_t ch = 0; ch < x->warm_chunks + x->chunks; ch++) {
        if (ch >= x->warm_chunks)
            c->samples[ch - x->warm_chunks] = vlab_tsc();
        for (uint64_t i = 0; i < x->chunk_msgs; i++) {
            if (recv_all(c, c->fd[1], sink, x->msg_bytes))
                goto out;
            vlab_msg_check(&e, sink, x->msg_bytes, x->flags);
        }
    }
    c->samples[x->chunks] = vlab_tsc();
out:
    collect_rx(x, &e);
    free(sink);
}

static void tcp_tx_echo(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    uint8_t *src = malloc(x->msg_bytes), *sink = malloc(x->msg_bytes);
    uint64_t n = total_msgs(x), warm = x->warm_chunks * x->chunk_msgs, seq = 0;
    struct vlab_spsc_end e;

    memset(&e, 0, sizeof(e));
    if (!src || !sink) {
        host_fail(c, ENOMEM, "malloc");
        goto out;
    }
    memset(src, 0x5a, x->msg_bytes);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = vlab_tsc(), t1;

        if ((x->flags & VLAB_XFER_F_BAD_SEQ) && seq == 5)
            seq++;
        vlab_msg_build(src, x->msg_bytes, seq++, x->flags);
        if (send_all(c, c->fd[0], src, x->msg_bytes) || recv_all(c, c->fd[0], sink, x->msg_bytes))
            break;
        t1 = vlab_tsc();
        vlab_msg_check(&e, sink, x->msg_bytes, x->flags);
        if (i >= warm)
            c->samples[i - warm] = t1 - t0;
    }
    collect_rx(x, &e);
out:
    free(src);
    free(sink);
}

static void tcp_rx_echo(struct host_ctx *c)
{
    struct vlab_xfer *x = c->x;
    uint8_t *sink = malloc(x->msg_bytes);
    uint64_t n = total_msgs(x);

    if (!sink) {
        host_fail(c, ENOMEM, "malloc");
        return;
    }
    for (uint64_t i = 0; i < n; i++)
        if (recv_all(c, c->fd[1], sink, x->msg_bytes) ||
            send_all(c, c->fd[1], sink, x->msg_bytes))
            break;
    free(sink);
}

static int tcp_pair(struct host_ctx *c)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);
    struct timeval tv = { (time_t)(c->x->timeout_ms / 1000), (long)(c->x->timeout_ms % 1000) * 1000 };
    int one = 1, lfd, r = 0;

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        return vlab_fail_errno("socket", "loopback listener");
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 1) ||
        getsockname(lfd, (struct sockaddr *)&a, &alen)) {
        r = vlab_fail_errno("bind", "127.0.0.1 listener");
        goto out;
    }
    c->fd[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd[0] < 0) {
        r = vlab_fail_errno("socket", "loopback client");
        goto out;
    }
    setsockopt(c->fd[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(c->fd[0], (struct sockaddr *)&a, sizeof(a))) {
        r = vlab_fail_errno("connect", "127.0.0.1:%u", ntohs(a.sin_port));
        goto out;
    }
    {
        struct pollfd pf = { lfd, POLLIN, 0 };

        if (poll(&pf, 1, (int)c->x->timeout_ms) != 1) {
            r = vlab_fail(ETIMEDOUT, "accept", "loopback connection not accepted in time");
            goto out;
        }
    }
    c->fd[1] = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (c->fd[1] < 0) {
        r = vlab_fail_errno("accept", "loopback connection");
        goto out;
    }
    for (int i = 0; i < 2; i++) {
        setsockopt(c->fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(c->fd[i], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        setsockopt(c->fd[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    }
out:
    close(lfd);
    return r;
}

int vlab_xfer_tcp_loopback(struct vlab_xfer *x, uint64_t *samples, uint64_t cap)
{
    struct host_ctx c;
    int r;

    r = xfer_check(x, cap, "vlab_xfer_tcp_loopback");
    if (r)
        return r;
    memset(&c, 0, sizeof(c));
    c.x = x;
    c.samples = samples;
    c.cap = cap;
    c.fd[0] = c.fd[1] = -1;
    r = tcp_pair(&c);
    if (!r)
        r = x->echo ? run_pair(&c, tcp_tx_echo, tcp_rx_echo, "vlab_xfer_tcp_loopback")
                    : run_pair(&c, tcp_tx_stream, tcp_rx_stream, "vlab_xfer_tcp_loopback");
    for (int i = 0; i < 2; i++)
        if (c.fd[i] >= 0)
            close(c.fd[i]);
    return r;
}

/* ---------------- copy cost (the copy term of the io.virtio model) ---------------- */

/* ns per copy of msg_bytes from one source into nbufs rotating destinations, as the backend
 * copies (memcpy) or as the ring and the guest driver copy (rep movsb: use_memcpy = 0). */
int vlab_copy_cost(uint32_t msg_bytes, uint32_t nbufs, uint64_t iters, int use_memcpy,
                   uint64_t *ns)
{
    uint8_t *src, *dst;
    uint64_t t0;

    if (!msg_bytes || !nbufs || !iters || msg_bytes > (16u << 20) || nbufs > 4096)
        return vlab_fail(EINVAL, "vlab_copy_cost", "bad arguments");
    src = malloc(msg_bytes);
    dst = malloc((size_t)msg_bytes * nbufs);
    if (!src || !dst) {
        free(src);
        free(dst);
        return vlab_fail(ENOMEM, "malloc", "copy cost buffers");
    }
    memset(src, 0x5a, msg_bytes);
    memset(dst, 0, (size_t)msg_bytes * nbufs);
    t0 = vlab_now_ns();
    for (uint64_t i = 0; i < iters; i++) {
        uint8_t *d = dst + (size_t)(i % nbufs) * msg_bytes;

        if (use_memcpy)
            memcpy(d, src, msg_bytes);
        else
            vlab_copy(d, src, msg_bytes);
        __asm__ volatile("" :: "r"(d) : "memory");
    }
    *ns = vlab_now_ns() - t0;
    free(src);
    free(dst);
    return 0;
}
