/*
 * vlab native VMM: the one header cffi reads.
 *
 * Everything between the cdef markers is plain C declarations (no preprocessor beyond
 * `#define NAME value`), so cffi's parser accepts it verbatim. Conventions:
 *   - functions are vlab_<object>_<verb>;
 *   - they return 0 (or a non-negative count / fd) on success and -errno on failure, and on
 *     failure fill the calling thread's error record (vlab_last_error), which names the ioctl
 *     or syscall that failed; the Python layer turns that into vlab.KvmError;
 *   - nothing here ever calls exit() or abort().
 */
#ifndef VLAB_H
#define VLAB_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */

/* ---- guest-physical layout (identity mapped: GVA == GPA) ---- */
#define VLAB_GPA_GDT          0x1000
#define VLAB_GPA_IDT          0x2000
#define VLAB_GPA_TSS          0xA0000
#define VLAB_TSS_STRIDE       0x3000
#define VLAB_TSS_LIMIT        8296
#define VLAB_GPA_PARAMS       0x4000
#define VLAB_GPA_KSTACKS      0x8000
#define VLAB_KSTACK_SIZE      0x1000
#define VLAB_GPA_USTACKS      0x20000
#define VLAB_USTACK_SIZE      0x10000
#define VLAB_GPA_IMAGE        0x100000
#define VLAB_IMAGE_MAX        0x300000
#define VLAB_GPA_RESULTS      0x400000
#define VLAB_RESULTS_SIZE     0x400000
#define VLAB_GPA_PTPOOL       0x800000
#define VLAB_GPA_MMIO         0xE0000000
#define VLAB_MMIO_SIZE        0x200000
#define VLAB_GPA_DATA         0x100000000
#define VLAB_MAX_VCPUS        8
#define VLAB_UCALL_PORT       0xF4
#define VLAB_EXC_PORT         0xF5
#define VLAB_IMAGE_MAGIC      0x42414c56

/* ucall types: the byte the guest writes to VLAB_UCALL_PORT */
#define VLAB_UCALL_DONE       1
#define VLAB_UCALL_SYNC       2
#define VLAB_UCALL_FAIL       3
#define VLAB_UCALL_PRINT      4
#define VLAB_UCALL_MARK       5

/* why vlab_vcpu_run returned */
#define VLAB_STOP_DONE            1
#define VLAB_STOP_SYNC            2
#define VLAB_STOP_FAIL            3
#define VLAB_STOP_EXCEPTION       4
#define VLAB_STOP_SHUTDOWN        5
#define VLAB_STOP_TIMEOUT         6
#define VLAB_STOP_INTR            7
#define VLAB_STOP_IO              8
#define VLAB_STOP_MMIO            9
#define VLAB_STOP_HLT             10
#define VLAB_STOP_DIRTY_RING_FULL 11
#define VLAB_STOP_SYSTEM_EVENT    12
#define VLAB_STOP_INTERNAL_ERROR  13
#define VLAB_STOP_FAIL_ENTRY      14
#define VLAB_STOP_UNKNOWN         15
#define VLAB_STOP_BAD_UCALL       16
#define VLAB_STOP_PRINT           17

/* memory backings */
#define VLAB_BACKING_4K          0
#define VLAB_BACKING_THP         1
#define VLAB_BACKING_HUGETLB_2M  2
#define VLAB_BACKING_HUGETLB_1G  3
#define VLAB_BACKING_MEMFD       4

/* slot flags (vlab's own; mapped to KVM_MEM_*) */
#define VLAB_SLOT_DIRTY_LOG   1
#define VLAB_SLOT_READONLY    2
#define VLAB_SLOT_PREFAULT    4

/* guest page-table mapping flags */
#define VLAB_MAP_WRITE        1
#define VLAB_MAP_USER         2
#define VLAB_MAP_PRESET_AD    4
#define VLAB_MAP_NX           8

/* run options (vcpu->run_flags) */
#define VLAB_RUN_STOP_ON_HLT  1
#define VLAB_RUN_STOP_ON_SYNC_REGS 2

#define VLAB_NR_EXIT_REASONS  64
#define VLAB_MAX_HANDLERS     32

struct vlab_error {
    int err;                /* errno (positive) */
    char op[48];            /* ioctl or syscall name, e.g. "KVM_CREATE_VM" */
    char msg[208];          /* extra detail */
    int vm_dead;            /* KVM said the VM is unusable (EIO after a bug), or KVM_RUN failed */
};

struct vlab_image_header {
    uint32_t magic;
    uint32_t version;
    uint64_t entry;         /* GVA of _start */
    uint64_t exc_stubs;     /* GVA of 32 exception stubs, 16 bytes apart */
    uint64_t syscall_entry; /* GVA that LSTAR points to */
    uint64_t image_end;     /* end of image incl. bss */
    uint64_t load_addr;     /* where the linker placed it (must be VLAB_GPA_IMAGE) */
    char name[16];
    uint64_t gate_null;     /* IDT vector 3 (int3, DPL3): enter CPL0 and iretq straight back */
    uint64_t gate_call;     /* IDT vector 4 (int $4, DPL3): call rax(rdi, rsi) at CPL0, iretq */
};

struct vlab_stop {
    int reason;             /* VLAB_STOP_* */
    uint32_t kvm_exit_reason;
    uint64_t arg[6];        /* reason-specific: see vcpu.c */
    uint64_t rip;
    int cpl;
    uint64_t t_enter_ns;    /* CLOCK_MONOTONIC of the first KVM_RUN entry of this call */
    uint64_t t_exit_ns;     /* ... and of the exit that ended the call */
    char msg[256];
};

struct vlab_vcpu_counters {
    uint64_t runs;          /* KVM_RUN ioctls issued */
    uint64_t exits[64];     /* user-space exits by KVM_EXIT_* reason */
    uint64_t ucalls;
    uint64_t marks;
    uint64_t io_sunk;       /* PIO exits consumed by a sink handler */
    uint64_t mmio_sunk;
    uint64_t hlt;
    uint64_t msr_user;
    uint64_t hypercall;
    uint64_t intr;
    uint64_t run_ns;        /* total time spent inside KVM_RUN */
};

struct vlab_kvm;
struct vlab_vm;
struct vlab_vcpu;
struct vlab_slot;

/* errors */
const struct vlab_error *vlab_last_error(void);
const char *vlab_exit_reason_name(uint32_t reason);

/* kvm handle */
int vlab_kvm_open(const char *path, struct vlab_kvm **out);
void vlab_kvm_close(struct vlab_kvm *kvm);
int vlab_kvm_fd(struct vlab_kvm *kvm);
int vlab_kvm_api_version(struct vlab_kvm *kvm);
int vlab_kvm_check_cap(struct vlab_kvm *kvm, int cap);
int vlab_kvm_cap_number(const char *name);
const char *vlab_kvm_cap_name(int index);
int vlab_kvm_supported_cpuid(struct vlab_kvm *kvm, uint32_t leaf, uint32_t index,
                             uint32_t *regs4);

/* VM */
int vlab_vm_create(struct vlab_kvm *kvm, struct vlab_vm **out);
void vlab_vm_destroy(struct vlab_vm *vm);
int vlab_vm_fd(struct vlab_vm *vm);
int vlab_vm_check_cap(struct vlab_vm *vm, int cap);
int vlab_vm_enable_cap(struct vlab_vm *vm, uint32_t cap, uint64_t arg0);
int vlab_vm_slot_add(struct vlab_vm *vm, uint64_t gpa, uint64_t size, int backing,
                     uint32_t flags, int share_fd, struct vlab_slot **out);
int vlab_vm_slot_set_flags(struct vlab_vm *vm, struct vlab_slot *slot, uint32_t flags);
int vlab_vm_slot_remove(struct vlab_vm *vm, struct vlab_slot *slot);
int vlab_slot_id(struct vlab_slot *slot);
uint64_t vlab_slot_gpa(struct vlab_slot *slot);
uint64_t vlab_slot_size(struct vlab_slot *slot);
void *vlab_slot_hva(struct vlab_slot *slot);
int vlab_slot_fd(struct vlab_slot *slot);
int vlab_slot_backing(struct vlab_slot *slot);
void *vlab_vm_gpa_to_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t len);

int vlab_vm_load_image(struct vlab_vm *vm, const uint8_t *image, uint64_t size,
                       struct vlab_image_header *hdr_out);
int vlab_vm_setup_tables(struct vlab_vm *vm, uint64_t ptpool_gpa, uint64_t ptpool_size);
int vlab_vm_as_create(struct vlab_vm *vm, uint64_t *root_gpa);
int vlab_vm_as_map(struct vlab_vm *vm, uint64_t root_gpa, uint64_t gva, uint64_t gpa,
                   uint64_t size, uint64_t page_size, uint32_t flags);
int vlab_vm_as_translate(struct vlab_vm *vm, uint64_t root_gpa, uint64_t gva, uint64_t *gpa,
                         uint64_t *pte_gpa, uint64_t *page_size);
uint64_t vlab_vm_ptpool_used(struct vlab_vm *vm);
uint64_t vlab_vm_ptpool_gpa(struct vlab_vm *vm);

int vlab_vm_add_pio_sink(struct vlab_vm *vm, uint16_t port, uint16_t count, uint64_t in_value);
int vlab_vm_add_mmio_sink(struct vlab_vm *vm, uint64_t gpa, uint64_t len, uint64_t read_value);
uint64_t vlab_vm_sink_hits(struct vlab_vm *vm, int index);
int vlab_vm_enable_user_msr(struct vlab_vm *vm, uint64_t read_value);
int vlab_vm_add_ioeventfd(struct vlab_vm *vm, uint64_t addr, uint32_t len, int pio);
int vlab_vm_stats_fd(struct vlab_vm *vm);

int vlab_vm_get_dirty_log(struct vlab_vm *vm, struct vlab_slot *slot, uint64_t *bitmap);
int vlab_vm_clear_dirty_log(struct vlab_vm *vm, struct vlab_slot *slot, uint64_t first_page,
                            uint32_t num_pages, uint64_t *bitmap);
int vlab_vm_enable_dirty_ring(struct vlab_vm *vm, uint32_t bytes);
int vlab_vm_reset_dirty_rings(struct vlab_vm *vm);
/* stop every vCPU of the VM (any thread): their runs fail with ECANCELED naming msg */
int vlab_vm_abort(struct vlab_vm *vm, const char *msg);

/* vCPU */
int vlab_vcpu_create(struct vlab_vm *vm, int id, struct vlab_vcpu **out);
void vlab_vcpu_destroy(struct vlab_vcpu *vcpu);
int vlab_vcpu_fd(struct vlab_vcpu *vcpu);
int vlab_vcpu_setup(struct vlab_vcpu *vcpu, int cpl, uint64_t cr3, uint64_t entry,
                    uint64_t stack_top);
int vlab_vcpu_set_entry_args(struct vlab_vcpu *vcpu, uint64_t rdi, uint64_t rsi);
int vlab_vcpu_set_interrupt_flag(struct vlab_vcpu *vcpu, int on);
int vlab_vcpu_set_runnable(struct vlab_vcpu *vcpu);
int vlab_vcpu_run(struct vlab_vcpu *vcpu, uint64_t timeout_ms, struct vlab_stop *stop);
int vlab_vcpu_run_immediate_exit(struct vlab_vcpu *vcpu, uint64_t n, uint64_t *ns_out);
void vlab_vcpu_set_run_flags(struct vlab_vcpu *vcpu, uint32_t flags);
int vlab_vcpu_set_mark_buffer(struct vlab_vcpu *vcpu, uint64_t *buf, uint64_t capacity);
uint64_t vlab_vcpu_mark_count(struct vlab_vcpu *vcpu);
const struct vlab_vcpu_counters *vlab_vcpu_counters(struct vlab_vcpu *vcpu);
void vlab_vcpu_reset_counters(struct vlab_vcpu *vcpu);
int vlab_vcpu_stats_fd(struct vlab_vcpu *vcpu);
int vlab_vcpu_get_rip(struct vlab_vcpu *vcpu, uint64_t *rip, int *cpl);
int vlab_vcpu_io_data(struct vlab_vcpu *vcpu, uint8_t **data, uint32_t *size);
int vlab_vcpu_mmio_data(struct vlab_vcpu *vcpu, uint8_t **data, uint32_t *len);
uint64_t vlab_vcpu_tsc_khz(struct vlab_vcpu *vcpu);
int vlab_vcpu_set_tsc_khz(struct vlab_vcpu *vcpu, uint32_t khz);
int vlab_vcpu_guest_tsc(struct vlab_vcpu *vcpu, uint64_t *guest, uint64_t *host_before,
                        uint64_t *host_after);
/* make a run in progress on another thread return (VLAB_STOP_INTR); 1 if signalled */
int vlab_vcpu_kick(struct vlab_vcpu *vcpu);
int vlab_vcpu_dirty_ring_harvest(struct vlab_vcpu *vcpu, uint32_t *slots, uint64_t *offsets,
                                 uint64_t capacity);
/* the whole vCPU state as an opaque, length-checked blob (migration) */
int64_t vlab_vcpu_state_size(void);
int vlab_vcpu_save_state(struct vlab_vcpu *vcpu, uint8_t *buf, uint64_t size);
int vlab_vcpu_load_state(struct vlab_vcpu *vcpu, const uint8_t *buf, uint64_t size);

/* ---- interrupts (native/vmm/irq.c): in-kernel irqchip, MSI routes, irqfd, LAPIC page ---- */
int vlab_irq_chip_create(struct vlab_vm *vm);
int vlab_irq_set_msi_routes(struct vlab_vm *vm, uint32_t n, const uint32_t *gsi,
                            const uint32_t *dest, const uint32_t *vector);
int vlab_irq_irqfd(struct vlab_vm *vm, int fd, uint32_t gsi, int assign);
int vlab_irq_signal_msi(struct vlab_vm *vm, uint32_t dest, uint32_t vector);
/* rdtsc, then signal the eventfd: the host's timestamp of an injection through an irqfd */
int vlab_irq_fire(int fd, uint64_t *tsc);
int vlab_irq_lapic_get(struct vlab_vcpu *vcpu, uint8_t *regs1024);

/* ---- live migration: guest memory in bulk (native/vmm/mem.c), userfaultfd (uffd.c) ---- */
int vlab_mem_page_hashes(const void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                         uint64_t *out);
int vlab_mem_buffer_hashes(const void *buf, uint64_t n, uint64_t *out);
int vlab_mem_gather(const void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                    void *out, uint64_t *hashes);
int vlab_mem_scatter(void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n,
                     const void *in, uint64_t *hashes);
int vlab_mem_discard(void *addr, uint64_t len);
uint64_t vlab_mem_add_u64(void *addr, uint64_t delta);
int vlab_mem_discard_pages(void *base, uint64_t n_pages, const uint64_t *idx, uint64_t n);
int vlab_uffd_open(uint64_t features, uint64_t *features_out);
int vlab_uffd_register(int fd, void *addr, uint64_t len, uint64_t *ioctls_out);
int vlab_uffd_unregister(int fd, void *addr, uint64_t len);
int vlab_uffd_read(int fd, int timeout_ms, uint64_t *addrs, uint32_t cap);
int vlab_uffd_copy(int fd, void *dst, const void *src, uint64_t len, uint64_t *copied);
int vlab_uffd_wake(int fd, void *addr, uint64_t len);
/* ---- end live migration ---- */

/* guest images compiled into this library */
const uint8_t *vlab_guest_image(const char *name, uint64_t *size);
const char *vlab_guest_image_name(int index);

/* small host helpers for timing (native/vmm/error.c, hostbench.c) */
uint64_t vlab_now_ns(void);
uint64_t vlab_rdtsc(void);
int vlab_host_syscall_loop(uint64_t n, uint64_t *cycles, uint64_t *ns);

/* ---- io area: split virtqueue device (native/vmm/virtio.c), doorbell (doorbell.c), host
 * rings and TCP (io.c), thread CPU time (task.c), VFIO (vfio.c); the ring and message format
 * are in vlab_spsc.h ---- */
#define VLAB_VQ_NOTIFY_USER    0
#define VLAB_VQ_NOTIFY_KERNEL  1
#define VLAB_VQ_NOTIFY_POLL    2
#define VLAB_VQ_MODE_TX        0
#define VLAB_VQ_MODE_ECHO      1
#define VLAB_VQ_F_EVENT_IDX    1
#define VLAB_VQ_F_CHECK        2
#define VLAB_VQ_F_VERIFY       4
#define VLAB_VQ_MAX_SIZE       32768
#define VLAB_VQ_ERR_NONE       0
#define VLAB_VQ_ERR_RING       1
#define VLAB_VQ_ERR_AVAIL_IDX  2
#define VLAB_VQ_ERR_HEAD       3
#define VLAB_VQ_ERR_NEXT       4
#define VLAB_VQ_ERR_LOOP       5
#define VLAB_VQ_ERR_ADDR       6
#define VLAB_VQ_ERR_OVERSIZE   7
#define VLAB_VQ_ERR_INDIRECT   8
#define VLAB_VQ_ERR_ORDER      9
#define VLAB_VQ_ERR_DIRECTION  10
/* used-buffer interrupts (vlab_virtq_set_irq): the 64-bit interrupt status word in guest memory
 * that the device and the driver share; bits 63..2 count the interrupts the device sent */
#define VLAB_VQ_ISR_PENDING    1   /* set by the device when it sends, cleared by the driver */
#define VLAB_VQ_ISR_CLOSED     2   /* set by the driver: send no more (end of a run) */
#define VLAB_VQ_ISR_ONE        4

#define VLAB_VFIO_REGION_MMAP  4

#define VLAB_XFER_F_VERIFY     1
#define VLAB_XFER_F_DOORBELL   2
#define VLAB_XFER_F_RAW        4
#define VLAB_XFER_F_BAD_SEQ    8
#define VLAB_XFER_F_BAD_SUM    16

struct vlab_virtq_config {
    uint32_t size;          /* queue size, a power of two <= VLAB_VQ_MAX_SIZE */
    uint32_t mode;          /* VLAB_VQ_MODE_* */
    uint32_t flags;         /* VLAB_VQ_F_* */
    uint32_t max_bytes;     /* longest chain (bytes) the device accepts */
    uint64_t desc_gpa;
    uint64_t avail_gpa;
    uint64_t used_gpa;
};

struct vlab_virtq_stats {
    uint64_t chains;        /* used entries returned */
    uint64_t descs;
    uint64_t bytes;         /* bytes read from the driver's buffers */
    uint64_t kicks;         /* notifications received (PIO exits, or eventfd counts) */
    uint64_t wakeups;       /* backend thread wake-ups */
    uint64_t irqs;          /* used-buffer notifications the device would send */
    uint64_t empty_polls;
    uint64_t bad_notifies;
    uint64_t seq_next, seq_errors, len_errors, sum_errors;
    uint64_t busy_ns;       /* time the backend spent processing */
    uint64_t cpu_ns;        /* CPU time of the backend thread (set when it exits) */
    uint64_t wait_ns;       /* ... and its time waiting for a CPU (other load on the host) */
    int32_t backend_tid;    /* 0 without a backend thread */
    uint32_t error;         /* VLAB_VQ_ERR_*: why the queue is broken */
    uint32_t last_avail;
    uint32_t used_idx;
    char message[200];
    uint64_t irqs_sent;     /* interrupts the device sent (irqfd writes; interrupt mode) */
    uint64_t irqs_masked;   /* notifications not sent: the last interrupt was still pending */
};

struct vlab_xfer {
    uint32_t msg_bytes;
    uint32_t batch;         /* messages per publication (native ring) */
    uint32_t flags;         /* VLAB_XFER_F_* */
    uint32_t echo;          /* 1: round trips, one sample each; 0: stream, one sample per chunk */
    uint64_t chunk_msgs;
    uint64_t chunks;
    uint64_t warm_chunks;
    uint64_t timeout_ms;
    uint64_t received, bytes, seq_errors, len_errors, sum_errors;
    uint64_t tx_cpu_ns, rx_cpu_ns;   /* CPU time of the producer / consumer thread */
    uint64_t tx_wait_ns, rx_wait_ns; /* their time runnable but waiting for a CPU */
    int32_t tx_tid, rx_tid;
    uint64_t wall_ns;
    uint64_t kicks, waits, full_spins, empty_spins;
    uint64_t tx_cpus, rx_cpus;       /* CPU masks (CPUs 0..63) to pin the two threads to; 0: none */
};

struct vlab_virtq;
struct vlab_vfio;

int vlab_virtq_create(struct vlab_vm *vm, const struct vlab_virtq_config *cfg, int notify,
                      uint16_t port, struct vlab_virtq **out);
int vlab_virtq_reset(struct vlab_virtq *q);
int vlab_virtq_start(struct vlab_virtq *q);
int vlab_virtq_stop(struct vlab_virtq *q);
void vlab_virtq_get_stats(struct vlab_virtq *q, struct vlab_virtq_stats *out);
int vlab_virtq_set_irq(struct vlab_virtq *q, int irqfd, uint64_t isr_gpa);
int vlab_virtq_process_buffer(uint8_t *image, uint64_t len, uint64_t gpa,
                              const struct vlab_virtq_config *cfg, uint32_t budget,
                              struct vlab_virtq_stats *out);

int vlab_vm_add_doorbell_wait(struct vlab_vm *vm, uint16_t port, int eventfd);
int vlab_vm_doorbell_counts(struct vlab_vm *vm, int index, uint64_t *waits, uint64_t *rings);

int vlab_xfer_native_ring(struct vlab_xfer *x, uint64_t *samples, uint64_t cap);
int vlab_xfer_tcp_loopback(struct vlab_xfer *x, uint64_t *samples, uint64_t cap);
int64_t vlab_task_cpu_ns(int32_t tid);
int64_t vlab_task_wait_ns(int32_t tid);
int64_t vlab_ring_bytes(uint32_t msg_bytes);
int64_t vlab_ring_setup(void *mem, uint64_t size, uint32_t msg_bytes);
int vlab_ring_solo(uint32_t msg_bytes, uint32_t batch, uint64_t rounds, uint64_t chunks,
                   uint64_t *samples);
int vlab_copy_cost(uint32_t msg_bytes, uint32_t nbufs, uint64_t iters, int use_memcpy,
                   uint64_t *ns);

int vlab_vfio_open(const char *container, const char *group, const char *bdf,
                   struct vlab_vfio **out);
void vlab_vfio_close(struct vlab_vfio *f);
int vlab_vfio_region(struct vlab_vfio *f, uint32_t index, uint64_t *size, uint64_t *offset,
                     uint32_t *flags);
int vlab_vfio_map_bar(struct vlab_vfio *f, struct vlab_vm *vm, uint32_t index, uint64_t gpa,
                      uint64_t *size_out);
int vlab_vfio_dma_map_cost(struct vlab_vfio *f, void *hva, uint64_t iova, uint64_t pages,
                           uint64_t *map_ns, uint64_t *unmap_ns);
/* ---- end io area ---- */
/* ---- paging experiments (native/vmm/paging_native.c): the shared kernels of
 * native/kernels/paging_kernels.h run on the host, over memory from the allocator guest slots
 * use (backing.c), and memory helpers for guest slots ---- */
struct vlab_paging_mem {
    void *hva;              /* aligned start */
    void *map;              /* what mmap returned */
    uint64_t map_len;
    uint64_t size;
    int backing;            /* VLAB_BACKING_* (not memfd) */
};
int vlab_paging_mem_alloc(struct vlab_paging_mem *m, uint64_t size, int backing);
void vlab_paging_mem_free(struct vlab_paging_mem *m);
int vlab_paging_mem_reset(void *hva, uint64_t len, int populate);
uint64_t vlab_paging_word(uint64_t index, uint64_t salt);
void vlab_paging_fill(void *base, uint64_t nwords, uint64_t salt);
void vlab_paging_chase_build(void *base, uint64_t nnodes, uint64_t stride, uint64_t seed);
uint64_t vlab_paging_touch_read(const void *base, uint64_t npages, uint64_t stride);
uint64_t vlab_paging_random_read(const void *base, uint64_t nwords, uint64_t n, uint64_t *state,
                                 uint64_t *sum);
uint64_t vlab_paging_chase(const void *base, uint64_t *off, uint64_t n, uint64_t *sum);
uint64_t vlab_paging_touch_write(void *base, uint64_t npages, uint64_t stride, uint64_t salt,
                                 uint64_t *sum);

/* cdef-end */

#endif
