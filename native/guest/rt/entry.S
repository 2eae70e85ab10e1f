/*
 * Guest runtime entry: image header, _start, exception stubs, syscall entry.
 * The host enters at _start with rdi = vCPU id, rsi = parameter page, rsp = this vCPU's stack,
 * at CPL3 or CPL0 as the experiment asked.
 */
#define UCALL_PORT 0xF4
#define EXC_PORT   0xF5

    .section .header, "a"
    .globl vlab_header
vlab_header:
    .long 0x42414c56            /* "VLAB" */
    .long 1                     /* header version */
    .quad _start
    .quad vlab_exc_stubs
    .quad vlab_syscall_entry
    .quad __image_end
    .quad __image_start
    .ascii "vlab-guest\0\0\0\0\0\0"
    .quad vlab_gate_null
    .quad vlab_gate_call

    .section .text.entry, "ax"
    .globl _start
_start:
    and $-16, %rsp
    call vlab_rt_main
    mov $1, %eax                /* ucall DONE */
    outb %al, $UCALL_PORT
1:  pause
    jmp 1b

/* 32 exception stubs, 16 bytes apart; the host points IDT vectors 0-31 at them. */
    .align 16
    .globl vlab_exc_stubs
vlab_exc_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .align 16
    .if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endr

/* Report vector, error code, RIP and CS to the host through registers, so a broken guest
 * memory image cannot garble the report. The host never resumes a faulted vCPU. */
exc_common:
    pop %rdi                    /* vector */
    pop %rsi                    /* error code */
    mov 0(%rsp), %r8            /* rip */
    mov 8(%rsp), %r9            /* cs */
    mov %cr2, %r10
    xor %eax, %eax
    outb %al, $EXC_PORT
2:  jmp 2b

/*
 * syscall: rax = 0 is a plain round trip that returns the handler's CS in rax, so the caller
 * can tell which privilege level the handler really ran at. On VMX/SVM it runs at CPL0 and
 * returns with sysretq; on PVM a guest syscall lands here still at CPL3, where sysretq would
 * #GP, so it returns like a user-mode trampoline (restore RFLAGS from r11, jump to rcx).
 * Clobbers rcx, r11 (as syscall does) and r10.
 */
    .globl vlab_syscall_entry
vlab_syscall_entry:
    mov %cs, %eax
    test $3, %eax
    jnz 4f
    sysretq
4:  push %r11
    popfq
    jmp *%rcx

/* int3 from CPL3: the cheapest real CPL3 -> CPL0 -> CPL3 round trip. */
    .globl vlab_gate_null
vlab_gate_null:
    iretq

/* int $4: call rax(rdi, rsi) at CPL0 and return its result in rax. */
    .globl vlab_gate_call
vlab_gate_call:
    push %rbp
    mov %rsp, %rbp
    and $-16, %rsp
    push %rcx
    push %rdx
    push %r8
    push %r9
    push %r10
    push %r11
    call *%rax
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdx
    pop %rcx
    mov %rbp, %rsp
    pop %rbp
    iretq
