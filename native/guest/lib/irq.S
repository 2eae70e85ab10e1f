/*
 * Interrupt stubs for vectors 32-255, 16 bytes apart from vlab_irq_stubs (vector v at
 * vlab_irq_stubs + 16 * (v - 32)). Each pushes its vector and enters irq_common, which saves the
 * registers the SysV ABI lets C clobber, calls irq_dispatch(vector, interrupted rsp) on an
 * aligned stack and returns with iretq. Guest code is built -mno-red-zone and
 * -mgeneral-regs-only, so nothing else needs saving.
 */
    .text
    .align 16
    .globl vlab_irq_stubs
vlab_irq_stubs:
    .set vec, 32
    .rept 224
    .align 16
    pushq $vec
    jmp irq_common
    .set vec, vec + 1
    .endr

irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbp
    mov 80(%rsp), %rdi          /* the vector the stub pushed */
    mov %rsp, %rsi
    mov %rsp, %rbp
    and $-16, %rsp
    call irq_dispatch
    mov %rbp, %rsp
    pop %rbp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq
