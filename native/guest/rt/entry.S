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

/* syscall: rax = 0 -> plain round trip; otherwise call rax(rdi, rsi) at CPL0 and return. */
    .globl vlab_syscall_entry
vlab_syscall_entry:
    test %rax, %rax
    jz 3f
    push %rbp
    mov %rsp, %rbp
    and $-16, %rsp
    push %rcx
    push %r11
    call *%rax
    pop %r11
    pop %rcx
    mov %rbp, %rsp
    pop %rbp
3:  sysretq
