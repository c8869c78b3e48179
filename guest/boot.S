/*
 * ferry test guest: PVH entry, long-mode set-up, AP trampoline, interrupt
 * stubs and the register soak routine.
 *
 * The PVH ABI enters at the address in Xen ELF note 18 in 32-bit protected
 * mode, paging off, flat CS/DS, EBX = hvm_start_info. We build page tables
 * mapping the first 4 GiB with 2 MiB pages (kernel.c extends the map above
 * 4 GiB), enable long mode and call kmain.
 */
#include "guest.h"

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PS 0x80

	.section .note.Xen, "a"
	.p2align 2
	.long 4            /* namesz */
	.long 4            /* descsz */
	.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_entry

	.section .boot, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl %ebx, start_info_ptr
	movl $(boot_stack + KSTACK_SIZE), %esp

	/* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; PDs map 4 GiB with 2 MiB pages. */
	movl $pdpt, %eax
	orl $(PTE_P | PTE_RW | PTE_US), %eax
	movl %eax, pml4
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $12, %eax
	addl $pd, %eax
	orl $(PTE_P | PTE_RW | PTE_US), %eax
	movl %eax, pdpt(, %ecx, 8)
	incl %ecx
	cmpl $4, %ecx
	jne 1b
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $21, %eax
	orl $(PTE_P | PTE_RW | PTE_US | PTE_PS), %eax
	movl %eax, pd(, %ecx, 8)
	movl %ecx, %eax
	shrl $11, %eax
	movl %eax, pd+4(, %ecx, 8)
	incl %ecx
	cmpl $2048, %ecx
	jne 2b

	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	lgdt boot_gdtr
	ljmp $0x18, $long_entry

	.code64
long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	xorw %ax, %ax
	movw %ax, %fs
	movw %ax, %gs
	movabsq $(boot_stack + KSTACK_SIZE), %rsp
	movl start_info_ptr, %edi
	call kmain
3:	cli
	hlt
	jmp 3b

/* Temporary GDT used by the BSP and the APs on their way to long mode. */
	.section .rodata
	.p2align 4
boot_gdt:
	.quad 0
	.quad 0x00cf9a000000ffff /* 0x08: 32-bit code */
	.quad 0x00cf92000000ffff /* 0x10: data */
	.quad 0x00af9a000000ffff /* 0x18: 64-bit code */
boot_gdt_end:
boot_gdtr:
	.word boot_gdt_end - boot_gdt - 1
	.long boot_gdt

/*
 * AP trampoline, copied to TRAMP_BASE by the BSP. Entered in real mode at
 * CS = TRAMP_BASE >> 4, IP = 0 after INIT-SIPI-SIPI.
 */
	.section .rodata
	.globl tramp_start, tramp_end, tramp_cr3
	.code16
tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl (tramp_gdtr - tramp_start)
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $0x08, $(TRAMP_BASE + tramp32 - tramp_start)
	.code32
tramp32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl (TRAMP_BASE + tramp_cr3 - tramp_start), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $0x18, $(TRAMP_BASE + tramp64 - tramp_start)
	.code64
tramp64:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	/* Our LAPIC ID selects the kernel stack that goes with this CPU. */
	movabsl 0xfee00020, %eax
	shrl $24, %eax
	andl $(MAX_CPUS - 1), %eax
	movl %eax, %edi
	movq %rdi, %rsp
	incq %rsp
	shlq $14, %rsp /* KSTACK_SIZE */
	movabsq $kstacks, %rax
	addq %rax, %rsp
	movabsq $ap_main, %rax
	call *%rax
4:	cli
	hlt
	jmp 4b
	.p2align 3
tramp_gdt:
	.quad 0
	.quad 0x00cf9a000000ffff
	.quad 0x00cf92000000ffff
	.quad 0x00af9a000000ffff
tramp_gdtr:
	.word 31
	.long TRAMP_BASE + tramp_gdt - tramp_start
tramp_cr3:
	.long 0
tramp_end:

/* Interrupt and exception entry: every stub pushes an error code (a zero if
 * the CPU does not) and the vector, then the common path saves the general
 * registers and calls trap(frame). */
	.text
	.code64
.macro STUB vec, has_err
	.p2align 4
stub_\vec:
	.if \has_err == 0
	pushq $0
	.endif
	pushq $\vec
	jmp trap_common
.endm

.altmacro
.macro STUBS from, to
	.if \from == 8 || \from == 10 || \from == 11 || \from == 12 || \from == 13 || \from == 14 || \from == 17 || \from == 21 || \from == 29 || \from == 30
	STUB \from, 1
	.else
	STUB \from, 0
	.endif
	.if \to - \from
	STUBS %(\from + 1), \to
	.endif
.endm
	STUBS 0, 31
	STUB 48, 0   /* VEC_TIMER */
	STUB 144, 0  /* VEC_SYSCALL */
	STUB 255, 0  /* VEC_SPURIOUS */

	.section .rodata
	.globl stub_table
	.p2align 3
.macro STUBPTR n
	.quad stub_\n
.endm
.macro STUBPTRS from, to
	STUBPTR %from
	.if \to - \from
	STUBPTRS %(\from + 1), \to
	.endif
.endm
stub_table:
	STUBPTRS 0, 31
	.globl stub_timer, stub_syscall, stub_spurious
	.set stub_timer, stub_48
	.set stub_syscall, stub_144
	.set stub_spurious, stub_255

	.text
trap_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	call trap
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

/* enter_user(rip, rsp, arg): drop to CPL 3 with IF=1 and IOPL=3. */
	.globl enter_user
enter_user:
	movq %rdx, %rax
	pushq $SEL_UDATA
	pushq %rsi
	pushq $0x3202
	pushq $SEL_UCODE
	pushq %rdi
	movq %rax, %rdi
	movw $SEL_UDATA, %ax
	movw %ax, %ds
	movw %ax, %es
	iretq

/* sys_idle: ask the kernel to halt until the next interrupt. Under PVM an
 * `int $n` from CPL 3 raises #UD instead of reaching a DPL 3 gate, so the
 * way in is a deliberate ud2 at this known address: the #UD handler
 * recognises it, halts, and resumes after it. */
	.globl sys_idle, sys_idle_ud
sys_idle:
	movl $1, %eax
sys_idle_ud:
	ud2
	ret

/*
 * reg_soak(expect, got, spins, avx): load known values into rbx, rbp,
 * r8-r15 and xmm0-15 (ymm0-15 when avx), spin `spins` times touching only
 * rax and rcx, then store every register to got. The caller compares. A
 * migration, interrupt or save/restore that loses or mixes up any of these
 * registers shows as a mismatch.
 * expect/got layout: [0..9] = rbx rbp r8..r15, [10..] = 16 vector registers
 * of 4 quadwords each (the upper two only meaningful with avx).
 */
	.globl reg_soak
reg_soak:
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	pushq %rsi
	pushq %rcx
	movq %rdx, %rax
	testq %rcx, %rcx
	jz 5f
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	vmovdqu (80 + 32 * \n)(%rdi), %ymm\n
.endr
	jmp 6f
5:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movdqu (80 + 32 * \n)(%rdi), %xmm\n
.endr
6:	movq 0(%rdi), %rbx
	movq 8(%rdi), %rbp
	movq 16(%rdi), %r8
	movq 24(%rdi), %r9
	movq 32(%rdi), %r10
	movq 40(%rdi), %r11
	movq 48(%rdi), %r12
	movq 56(%rdi), %r13
	movq 64(%rdi), %r14
	movq 72(%rdi), %r15
	xorl %edi, %edi
	xorl %esi, %esi
	xorl %edx, %edx
7:	decq %rax
	jnz 7b
	popq %rcx
	popq %rdi
	movq %rbx, 0(%rdi)
	movq %rbp, 8(%rdi)
	movq %r8, 16(%rdi)
	movq %r9, 24(%rdi)
	movq %r10, 32(%rdi)
	movq %r11, 40(%rdi)
	movq %r12, 48(%rdi)
	movq %r13, 56(%rdi)
	movq %r14, 64(%rdi)
	movq %r15, 72(%rdi)
	testq %rcx, %rcx
	jz 8f
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	vmovdqu %ymm\n, (80 + 32 * \n)(%rdi)
.endr
	vzeroupper
	jmp 9f
8:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movdqu %xmm\n, (80 + 32 * \n)(%rdi)
.endr
9:	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	ret

	.section .note.GNU-stack, "", @progbits
