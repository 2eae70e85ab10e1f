/*
 * kvm_loop: a minimal standalone KVM program that the tracing tests run as a traced child.
 *
 * It exists so that tests/test_trace.py can check vlab.trace against exact, known event
 * counts without depending on vlab's own VMM. The guest runs in real mode (no page tables, no
 * GDT) and does, in order:
 *   N x `out %al, %dx` to PORT          -> N KVM_EXIT_IO exits (kvm_pio, kvm_userspace_exit)
 *   N x `cpuid` (leaf 0)                -> handled in the kernel (kvm_cpuid), no user-space exit
 *   N x `movb %al, 0` with DS at MMIO   -> N KVM_EXIT_MMIO exits (kvm_mmio write)
 *   hlt                                 -> KVM_EXIT_HLT (no in-kernel irqchip)
 *
 * Usage: kvm_loop N [PORT] [--wait]
 *   --wait: set the VM up, print "ready" on stderr, then block until a byte arrives on stdin
 *           (lets a test attach its tracer to our pid before the guest runs).
 * Prints one JSON line on stdout: exit counts and host-side timings of the out and MMIO
 * phases (ns per exit, measured from the first to the last exit of each phase).
 * Exit status: 0 when every count is as expected, 1 otherwise, 2 on usage or KVM errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_MEM_SIZE 0x10000u  /* one 64 KiB memslot at GPA 0 */
#define GUEST_CODE_GPA 0x1000u
#define MMIO_GPA 0x80000u        /* not covered by any memslot: every access exits */

/*
 * Guest code, assembled by gcc's assembler as 16-bit code. Inputs in registers set by the host:
 * EDI = N, DX = port. CPUID clobbers EAX..EDX, so the CPUID loop counts in ESI.
 */
extern const unsigned char guest_code_start[], guest_code_end[];
__asm__(
    ".pushsection .rodata\n"
    ".globl guest_code_start\n"
    ".globl guest_code_end\n"
    "guest_code_start:\n"
    ".code16\n"
    "    movl %edi, %ecx\n"
    "    testl %ecx, %ecx\n"
    "    jz 2f\n"
    "1:  outb %al, %dx\n"
    "    decl %ecx\n"
    "    jnz 1b\n"
    "2:  movl %edi, %esi\n"
    "    testl %esi, %esi\n"
    "    jz 4f\n"
    "3:  xorl %eax, %eax\n"
    "    xorl %ecx, %ecx\n"
    "    cpuid\n"
    "    decl %esi\n"
    "    jnz 3b\n"
    "4:  movl %edi, %ecx\n"
    "    testl %ecx, %ecx\n"
    "    jz 6f\n"
    "5:  movb %al, 0\n"          /* DS base is MMIO_GPA: a write to unmapped guest memory */
    "    decl %ecx\n"
    "    jnz 5b\n"
    "6:  hlt\n"
    "    jmp 6b\n"
    ".code64\n"
    "guest_code_end:\n"
    ".popsection\n");

static void die(const char *what)
{
    fprintf(stderr, "kvm_loop: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    unsigned long n = 0;
    unsigned port = 0x3f8;
    int wait_for_go = 0, npos = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) {
            wait_for_go = 1;
        } else if (npos == 0) {
            n = strtoul(argv[i], NULL, 0);
            npos++;
        } else if (npos == 1) {
            port = (unsigned)strtoul(argv[i], NULL, 0) & 0xffff;
            npos++;
        } else {
            fprintf(stderr, "usage: kvm_loop N [PORT] [--wait]\n");
            return 2;
        }
    }
    if (npos == 0 || n > 0xffffffffUL) {
        fprintf(stderr, "usage: kvm_loop N [PORT] [--wait]\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0)
        die("KVM_CREATE_VM");

    unsigned char *mem = mmap(NULL, GUEST_MEM_SIZE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    size_t code_len = (size_t)(guest_code_end - guest_code_start);
    memcpy(mem + GUEST_CODE_GPA, guest_code_start, code_len);

    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = MMIO_GPA;
    sregs.ds.selector = MMIO_GPA >> 4;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");

    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = GUEST_CODE_GPA;
    regs.rflags = 0x2;
    regs.rdi = n;
    regs.rdx = port;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    if (wait_for_go) {
        char c;
        fprintf(stderr, "ready\n");
        if (read(STDIN_FILENO, &c, 1) < 0)
            die("read go byte");
    }

    unsigned long io = 0, io_other = 0, mmio_w = 0, mmio_other = 0, hlt = 0, intr = 0;
    uint64_t io_first = 0, io_last = 0, mmio_first = 0, mmio_last = 0;
    uint64_t t0 = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0UL) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                intr++;
                continue;
            }
            die("KVM_RUN");
        }
        uint64_t t = now_ns();
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == port && run->io.count == 1) {
                if (io == 0)
                    io_first = t;
                io_last = t;
                io++;
            } else {
                io_other++;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (run->mmio.is_write && run->mmio.phys_addr == MMIO_GPA) {
                if (mmio_w == 0)
                    mmio_first = t;
                mmio_last = t;
                mmio_w++;
            } else {
                mmio_other++;
            }
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            hlt++;
            break;
        } else {
            fprintf(stderr, "kvm_loop: unexpected exit reason %u\n", run->exit_reason);
            return 2;
        }
    }
    uint64_t total = now_ns() - t0;

    double io_ns = io > 1 ? (double)(io_last - io_first) / (double)(io - 1) : 0.0;
    double mmio_ns = mmio_w > 1 ? (double)(mmio_last - mmio_first) / (double)(mmio_w - 1) : 0.0;
    printf("{\"n\": %lu, \"port\": %u, \"io_exits\": %lu, \"io_other\": %lu, \"mmio_writes\": %lu, "
           "\"mmio_other\": %lu, \"hlt\": %lu, \"eintr\": %lu, \"io_ns_per_exit\": %.1f, "
           "\"mmio_ns_per_exit\": %.1f, \"total_ns\": %llu, \"pid\": %d}\n",
           n, port, io, io_other, mmio_w, mmio_other, hlt, intr, io_ns, mmio_ns,
           (unsigned long long)total, (int)getpid());
    return (io == n && mmio_w == n && hlt == 1 && io_other == 0 && mmio_other == 0) ? 0 : 1;
}
