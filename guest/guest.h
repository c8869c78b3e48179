/* ferry test guest: shared definitions between boot.S, kernel.c and user.c. */
#ifndef FERRY_GUEST_H
#define FERRY_GUEST_H

#define MAX_CPUS 16
#define KSTACK_SIZE 16384
#define USTACK_SIZE 65536

/* GDT selectors. */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b
#define SEL_UCODE 0x23
#define GDT_TSS_INDEX 5

/* Interrupt vectors. */
#define VEC_TIMER 0x30
#define VEC_SYSCALL 0x90 /* not 0x80: PVM reserves int $0x80 from CPL 3 */
#define VEC_SPURIOUS 0xff

/* AP trampoline: real-mode entry at TRAMP_BASE (SIPI vector TRAMP_BASE>>12). */
#define TRAMP_BASE 0x10000

/* Port of ferry's exit device; also QEMU's isa-debug-exit default iobase. */
#define EXIT_PORT 0xf4
#define COM1 0x3f8

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void) {
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Configuration parsed from the command line by the kernel, read by the
 * workloads at CPL 3 (all memory is user-accessible in this guest). */
enum workload { W_IDLE, W_DIRTY, W_VERIFY };
enum pattern { P_SEQ, P_RANDOM, P_HOTCOLD };
/* Fill content (fill.c); C_MIXED chooses one of the others per page. */
enum content { C_MIXED, C_TEXT, C_REPEAT, C_RANDOM, C_ZERO };

struct config {
	enum workload workload;
	enum pattern pattern;
	u64 size;      /* working set in bytes, all CPUs together */
	u64 rate;      /* target dirty rate, bytes/s, all CPUs together; 0 = unlimited */
	u64 hb_ms;     /* heartbeat interval */
	u64 exit_ms;   /* exit after this long (0 = never) */
	u64 seed;
	u64 tsc_khz;
	u32 ncpus;
	u32 expect_cpus;
	u64 region_base, region_size; /* workload memory, page aligned */
	u64 fill;      /* fill= as given, bytes */
	enum content content;
	int fill_check;
	int check;     /* dirty: verify each page before rewriting it */
	u64 fill_base, fill_pages; /* fill area: right after the workload region, page aligned */
	int have_avx;
	u64 boot_tsc;
};

extern struct config cfg;
extern volatile u32 cpus_online;

/* Lines on the console (polled 16550 at COM1, locked across CPUs). */
void con_lock(void);
void con_unlock(void);
void con_puts(const char *s);
void con_putdec(u64 v);
void con_puthex(u64 v);
void con_kv(const char *key, u64 v);   /* " key=decimal" */
void con_kvx(const char *key, u64 v);  /* " key=0xhex" */

void user_main(u64 cpu);                /* CPL 3 entry of each CPU */
void guest_exit(u32 status);            /* works at CPL 0 and 3 */

/* fill.c: page f of the fill area is a pure function of (seed, content, f). */
const char *content_name(enum content c);
enum content fill_class(u64 f);        /* never C_MIXED */
void fill_content(u64 *w, u64 f);      /* writes the 4 KiB page */

/* splitmix64 finaliser: the guest's one hash. */
static inline u64 mix(u64 z) {
	z += 0x9e3779b97f4a7c15UL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* boot.S */
void enter_user(u64 rip, u64 rsp, u64 arg);
void reg_soak(const u64 *expect, u64 *got, u64 spins, u64 avx);
void sys_idle(void); /* int $0x80: sti; hlt in the kernel */
#endif
#endif
