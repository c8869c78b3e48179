/*
 * ferry test guest, CPL 0 part: reads the PVH start_info, parses the
 * command line, sets up per-CPU GDT/TSS/IDT, the LAPIC timer and SMP, and
 * drops every CPU to CPL 3 where the workload runs. Under PVM, CPL 0 code
 * is emulated, so this part does as little as it can and stays out of the
 * way afterwards (timer ticks and idle halts only).
 */
#include "guest.h"

#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_US 0x4UL
#define PTE_PWT 0x8UL
#define PTE_PCD 0x10UL
#define PTE_PS 0x80UL
#define LAPIC_BASE 0xfee00000UL
#define HZ 100

struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
	u64 addr, size;
	u32 type, reserved;
};

struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
	/* I/O permission bitmap: all zero = every port allowed at CPL 3 (PVM
	 * exits to the VMM on port I/O from CPL 3 only through this bitmap). */
	u8 iomap[8192 + 1];
} __attribute__((packed));

struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err, rip, cs, rflags, rsp, ss;
};

/* Page tables: boot.S maps 4 GiB; pd_high maps RAM above 4 GiB (up to 64 GiB). */
u64 pml4[512] __attribute__((aligned(4096)));
u64 pdpt[512] __attribute__((aligned(4096)));
u64 pd[4 * 512] __attribute__((aligned(4096)));
static u64 pd_high[60 * 512] __attribute__((aligned(4096)));

u8 boot_stack[KSTACK_SIZE] __attribute__((aligned(16)));
u8 kstacks[MAX_CPUS + 1][KSTACK_SIZE] __attribute__((aligned(16)));
static u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(16)));
static struct tss tsses[MAX_CPUS] __attribute__((aligned(16)));
static u64 gdt[GDT_TSS_INDEX + 2 * MAX_CPUS] __attribute__((aligned(16)));
static struct idt_entry idt[256] __attribute__((aligned(16)));
u32 start_info_ptr;
volatile u32 ap_next_index = 1;
volatile u32 cpus_online;
static volatile u32 go_user;
volatile u64 ticks[MAX_CPUS];
struct config cfg;
static char cmdline[1024];

extern u64 stub_table[32];
extern char stub_timer[], stub_syscall[], stub_spurious[], sys_idle_ud[];
extern char tramp_start[], tramp_end[], tramp_cr3[];
extern char __image_end[];

static inline void wrmsr(u32 msr, u64 v) {
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 read_cr4(void) {
	u64 v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v)); }
static inline u64 read_cr0(void) {
	u64 v;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v)); }
static inline u64 read_cr2(void) {
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }

static void kmemcpy(void *d, const void *s, u64 n) {
	u8 *dd = d;
	const u8 *ss = s;
	while (n--) *dd++ = *ss++;
}

/* ---- command line ---- */

static int streq_n(const char *a, const char *b, u64 n) {
	for (u64 i = 0; i < n; i++)
		if (a[i] != b[i]) return 0;
	return b[n] == 0;
}

/* parse_size: "256M", "1G", "4096", "200k"; K/M/G are powers of 1024 for
 * sizes; for rates the same suffixes mean bytes per second. */
static u64 parse_num(const char *s, u64 n, int *ok) {
	u64 v = 0, i = 0;
	*ok = n > 0;
	for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (u64)(s[i] - '0');
	if (i == 0) *ok = 0;
	if (i < n) {
		switch (s[i]) {
		case 'k': case 'K': v <<= 10; break;
		case 'm': case 'M': v <<= 20; break;
		case 'g': case 'G': v <<= 30; break;
		default: *ok = 0;
		}
		if (i + 1 != n) *ok = 0;
	}
	return v;
}

/* parse_ms: "5s", "250ms", "2m", bare number = seconds. */
static u64 parse_ms(const char *s, u64 n, int *ok) {
	u64 v = 0, i = 0;
	for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (u64)(s[i] - '0');
	*ok = i > 0;
	if (i == n || (i + 1 == n && s[i] == 's')) return v * 1000;
	if (i + 2 == n && s[i] == 'm' && s[i + 1] == 's') return v;
	if (i + 1 == n && s[i] == 'm') return v * 60000;
	*ok = 0;
	return 0;
}

static void bad_arg(const char *k, u64 kn) {
	con_lock();
	con_puts("ferry-guest: warning unknown or malformed argument ");
	char b[64];
	u64 n = kn < 63 ? kn : 63;
	kmemcpy(b, k, n);
	b[n] = 0;
	con_puts(b);
	con_puts("\n");
	con_unlock();
}

static void parse_cmdline(void) {
	cfg.workload = W_IDLE;
	cfg.pattern = P_SEQ;
	cfg.hb_ms = 100;
	cfg.seed = 1;
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ') p++;
		const char *tok = p;
		while (*p && *p != ' ') p++;
		u64 tn = (u64)(p - tok);
		if (!tn) continue;
		u64 eq = 0;
		while (eq < tn && tok[eq] != '=') eq++;
		if (eq == tn) { bad_arg(tok, tn); continue; }
		const char *v = tok + eq + 1;
		u64 vn = tn - eq - 1;
		int ok = 1;
		if (streq_n(tok, "workload", eq)) {
			if (streq_n(v, "idle", vn)) cfg.workload = W_IDLE;
			else if (streq_n(v, "dirty", vn)) cfg.workload = W_DIRTY;
			else if (streq_n(v, "verify", vn)) cfg.workload = W_VERIFY;
			else ok = 0;
		} else if (streq_n(tok, "pattern", eq)) {
			if (streq_n(v, "seq", vn)) cfg.pattern = P_SEQ;
			else if (streq_n(v, "random", vn)) cfg.pattern = P_RANDOM;
			else if (streq_n(v, "hotcold", vn)) cfg.pattern = P_HOTCOLD;
			else ok = 0;
		} else if (streq_n(tok, "content", eq)) {
			if (streq_n(v, "mixed", vn)) cfg.content = C_MIXED;
			else if (streq_n(v, "text", vn)) cfg.content = C_TEXT;
			else if (streq_n(v, "repeat", vn)) cfg.content = C_REPEAT;
			else if (streq_n(v, "random", vn)) cfg.content = C_RANDOM;
			else if (streq_n(v, "zero", vn)) cfg.content = C_ZERO;
			else ok = 0;
		} else if (streq_n(tok, "size", eq)) cfg.size = parse_num(v, vn, &ok);
		else if (streq_n(tok, "fill", eq)) cfg.fill = parse_num(v, vn, &ok);
		else if (streq_n(tok, "fill_check", eq)) cfg.fill_check = parse_num(v, vn, &ok) != 0;
		else if (streq_n(tok, "check", eq)) cfg.check = parse_num(v, vn, &ok) != 0;
		else if (streq_n(tok, "rate", eq)) cfg.rate = parse_num(v, vn, &ok);
		else if (streq_n(tok, "hb", eq)) cfg.hb_ms = parse_ms(v, vn, &ok);
		else if (streq_n(tok, "exit_after", eq)) cfg.exit_ms = parse_ms(v, vn, &ok);
		else if (streq_n(tok, "seed", eq)) cfg.seed = parse_num(v, vn, &ok);
		else if (streq_n(tok, "cpus", eq)) cfg.expect_cpus = (u32)parse_num(v, vn, &ok);
		else if (streq_n(tok, "tsc_khz", eq)) cfg.tsc_khz = parse_num(v, vn, &ok);
		else if (streq_n(tok, "console", eq) || streq_n(tok, "earlyprintk", eq)) ok = 1; /* harmless */
		else ok = 0;
		if (!ok) bad_arg(tok, tn);
	}
	if (cfg.hb_ms == 0) cfg.hb_ms = 100;
}

/* ---- console (shared with user mode: all memory is user-accessible) ---- */

static volatile u32 con_lock_word;
void con_lock(void) {
	while (__atomic_exchange_n(&con_lock_word, 1, __ATOMIC_ACQUIRE)) cpu_relax();
}
void con_unlock(void) { __atomic_store_n(&con_lock_word, 0, __ATOMIC_RELEASE); }
static void con_putc(char c) {
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++) cpu_relax();
	outb(COM1, (u8)c);
}
void con_puts(const char *s) {
	while (*s) con_putc(*s++);
}
void con_putdec(u64 v) {
	char b[24];
	int i = 23;
	b[i] = 0;
	do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	con_puts(b + i);
}
void con_puthex(u64 v) {
	char b[19];
	int i = 18;
	b[i] = 0;
	do { b[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
	b[--i] = 'x';
	b[--i] = '0';
	con_puts(b + i);
}
void con_kv(const char *k, u64 v) { con_puts(" "); con_puts(k); con_puts("="); con_putdec(v); }
void con_kvx(const char *k, u64 v) { con_puts(" "); con_puts(k); con_puts("="); con_puthex(v); }

void guest_exit(u32 status) {
	outl(EXIT_PORT, status);
	/* Without an exit device (plain QEMU), stop here. */
	for (;;) __asm__ volatile("pause");
}

/* ---- traps ---- */

static u32 cpu_index(void) {
	u32 id = lapic_read(0x20) >> 24;
	return id < MAX_CPUS ? id : 0;
}

void trap(struct trap_frame *f) {
	if (f->vec == VEC_TIMER) {
		ticks[cpu_index()]++;
		lapic_write(0xb0, 0);
		return;
	}
	if (f->vec == VEC_SYSCALL) {
		if (f->rax == 1) /* idle: wait for the next interrupt */
			__asm__ volatile("sti; hlt; cli");
		return;
	}
	if (f->vec == VEC_SPURIOUS) return;
	if (f->vec == 6 && f->rip == (u64)sys_idle_ud && (f->cs & 3) == 3) {
		/* The CPL 3 idle call (see boot.S): wait for an interrupt. */
		f->rip += 2;
		__asm__ volatile("sti; hlt; cli");
		return;
	}
	con_lock();
	con_puts("ferry-guest: EXCEPTION");
	con_kv("cpu", cpu_index());
	con_kv("vec", f->vec);
	con_kvx("err", f->err);
	con_kvx("rip", f->rip);
	con_kvx("rsp", f->rsp);
	con_kvx("cs", f->cs);
	con_kvx("rflags", f->rflags);
	con_kvx("cr2", read_cr2());
	con_kvx("rax", f->rax);
	con_kvx("rbx", f->rbx);
	con_kvx("rcx", f->rcx);
	con_kvx("rdx", f->rdx);
	con_kvx("rsi", f->rsi);
	con_kvx("rdi", f->rdi);
	con_puts("\n");
	con_unlock();
	guest_exit(0xfe);
}

static void set_gate(int vec, void *fn, int dpl) {
	u64 a = (u64)fn;
	idt[vec].off0 = (u16)a;
	idt[vec].sel = SEL_KCODE;
	idt[vec].ist = 0;
	idt[vec].type = (u8)(0x8e | (dpl << 5)); /* present, interrupt gate */
	idt[vec].off1 = (u16)(a >> 16);
	idt[vec].off2 = (u32)(a >> 32);
	idt[vec].zero = 0;
}

static void build_tables(void) {
	gdt[0] = 0;
	gdt[1] = 0x00af9a000000ffffUL; /* kernel code 64 */
	gdt[2] = 0x00cf92000000ffffUL; /* kernel data */
	gdt[3] = 0x00cff2000000ffffUL; /* user data, DPL 3 */
	gdt[4] = 0x00affa000000ffffUL; /* user code 64, DPL 3 */
	for (int i = 0; i < MAX_CPUS; i++) {
		struct tss *t = &tsses[i];
		u64 base = (u64)t, limit = sizeof(*t) - 1;
		t->rsp0 = (u64)&kstacks[i + 1][0]; /* top of kstacks[i] */
		t->iomap_base = (u16)__builtin_offsetof(struct tss, iomap);
		t->iomap[8192] = 0xff;
		gdt[GDT_TSS_INDEX + 2 * i] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
					     (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
		gdt[GDT_TSS_INDEX + 2 * i + 1] = base >> 32;
	}
	for (int v = 0; v < 32; v++) set_gate(v, (void *)stub_table[v], 0);
	set_gate(VEC_TIMER, stub_timer, 0);
	set_gate(VEC_SYSCALL, stub_syscall, 3);
	set_gate(VEC_SPURIOUS, stub_spurious, 0);
}

static void load_tables(u32 cpu) {
	struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = {sizeof(gdt) - 1, (u64)gdt},
								   idtr = {sizeof(idt) - 1, (u64)idt};
	__asm__ volatile("lgdt %0" ::"m"(gdtr));
	__asm__ volatile("lidt %0" ::"m"(idtr));
	__asm__ volatile("pushq %0; leaq 1f(%%rip), %%rax; pushq %%rax; lretq; 1:" ::"i"(SEL_KCODE) : "rax", "memory");
	__asm__ volatile("movw %0, %%ds; movw %0, %%es; movw %0, %%ss" ::"r"((u16)SEL_KDATA));
	__asm__ volatile("ltr %0" ::"r"((u16)((GDT_TSS_INDEX + 2 * cpu) * 8)));
}

/* FPU/SSE/AVX for user mode: CR0.MP, no EM/TS; CR4.OSFXSR|OSXMMEXCPT|OSXSAVE;
 * XCR0 = x87|SSE|AVX where the CPU has AVX. */
static void enable_simd(void) {
	u32 a, b, c, d;
	write_cr0((read_cr0() & ~(u64)0xc) | 0x2);
	u64 cr4 = read_cr4() | (1UL << 9) | (1UL << 10);
	cpuid(1, 0, &a, &b, &c, &d);
	int xsave = (c >> 26) & 1, avx = (c >> 28) & 1;
	if (xsave) cr4 |= 1UL << 18;
	write_cr4(cr4);
	if (xsave) {
		u64 xcr0 = 3 | (avx ? 4 : 0);
		__asm__ volatile("xsetbv" ::"c"(0), "a"((u32)xcr0), "d"((u32)(xcr0 >> 32)));
	}
	cfg.have_avx = xsave && avx;
}

static void lapic_init(u64 apic_hz) {
	lapic_write(0xf0, 0x100 | VEC_SPURIOUS); /* software enable */
	lapic_write(0x3e0, 0xb);                 /* divide by 1 */
	lapic_write(0x320, (1 << 17) | VEC_TIMER); /* periodic */
	lapic_write(0x380, (u32)(apic_hz / HZ));
}

/* ---- timing ---- */

static u64 apic_hz;

/* pvclock_vcpu_time_info, filled by KVM once MSR_KVM_SYSTEM_TIME_NEW points
 * at it. Its TSC-to-nanoseconds scale gives the TSC frequency on any KVM
 * host, without relying on a PIT speaker port (QEMU's microvm has none). */
static struct {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags, pad[2];
} pvclock __attribute__((aligned(64)));

static u64 kvmclock_tsc_khz(void) {
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (b != 0x4b4d564b || a < 0x40000001) return 0; /* "KVMK" */
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	if (!(a & (1 << 3))) return 0; /* KVM_FEATURE_CLOCKSOURCE2 */
	wrmsr(0x4b564d01, (u64)&pvclock | 1);
	for (int i = 0; i < 1000000 && !pvclock.tsc_to_system_mul; i++) cpu_relax();
	wrmsr(0x4b564d01, 0);
	if (!pvclock.tsc_to_system_mul) return 0;
	u64 khz = (1000000UL << 32) / pvclock.tsc_to_system_mul;
	if (pvclock.tsc_shift > 0) khz >>= pvclock.tsc_shift;
	else khz <<= -pvclock.tsc_shift;
	return khz;
}

static void calibrate(void) {
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (!cfg.tsc_khz && a >= 0x40000010) {
		cpuid(0x40000010, 0, &a, &b, &c, &d);
		if (a) { cfg.tsc_khz = a; apic_hz = (u64)b * 1000; }
	}
	if (!cfg.tsc_khz) cfg.tsc_khz = kvmclock_tsc_khz();
	if (!cfg.tsc_khz) {
		/* PIT channel 2, mode 0, 10 ms, gate through port 0x61. */
		outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
		outb(0x43, 0xb0);
		u32 latch = 1193182 / 100;
		outb(0x42, (u8)latch);
		outb(0x42, (u8)(latch >> 8));
		u64 t0 = rdtsc();
		for (u64 i = 0; i < 10000000 && !(inb(0x61) & 0x20); i++) ;
		cfg.tsc_khz = (rdtsc() - t0) / 10;
	}
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (!apic_hz && b == 0x4b4d564b) apic_hz = 1000000000; /* KVM's LAPIC timer: 1 ns per count */
	if (!apic_hz) {
		/* Count the LAPIC timer down over 10 ms of TSC. */
		lapic_write(0x3e0, 0xb);
		lapic_write(0x320, 1 << 16); /* masked, one-shot */
		lapic_write(0x380, 0xffffffff);
		u64 t0 = rdtsc(), until = t0 + cfg.tsc_khz * 10;
		while (rdtsc() < until) ;
		apic_hz = (u64)(0xffffffffU - lapic_read(0x390)) * 100;
	}
}

/* ---- memory ---- */

static void map_high_and_pick_region(struct hvm_start_info *si) {
	struct hvm_memmap_entry *mm = (void *)si->memmap_paddr;
	u64 best_base = 0, best_size = 0, top = 0;
	u64 img_end = ((u64)__image_end + 0x1fffff) & ~0x1fffffUL;
	for (u32 i = 0; i < si->memmap_entries; i++) {
		if (mm[i].type != 1) continue;
		u64 s = mm[i].addr, e = mm[i].addr + mm[i].size;
		if (e > top) top = e;
		if (s < img_end) s = img_end;
		s = (s + 0x1fffff) & ~0x1fffffUL;
		e &= ~0x1fffffUL;
		if (e > s && e - s > best_size) { best_base = s; best_size = e - s; }
	}
	/* Map RAM above 4 GiB (2 MiB pages, PDPT entries 4..63). */
	for (u64 gb = 4; gb < 64 && gb * (1UL << 30) < top; gb++) {
		u64 *pdp = &pd_high[(gb - 4) * 512];
		for (u64 j = 0; j < 512; j++) pdp[j] = ((gb << 30) + (j << 21)) | PTE_P | PTE_RW | PTE_US | PTE_PS;
		pdpt[gb] = (u64)pdp | PTE_P | PTE_RW | PTE_US;
	}
	/* The 32-bit MMIO hole: kernel only, uncached. */
	for (u64 j = 3 * 512; j < 4 * 512; j++) pd[j] = (j << 21) | PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT;
	__asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
	cfg.region_base = best_base;
	cfg.region_size = best_size;
	u64 fill = cfg.fill & ~0xfffUL;
	if (fill) {
		/* The fill area follows the working set; without size= the working
		 * set is what the fill leaves. Both must fit: no silent shrinking. */
		u64 ws = cfg.size ? cfg.size & ~0xfffUL : fill < best_size ? best_size - fill : 0;
		if (!ws || fill >= best_size || ws > best_size - fill) {
			con_lock();
			con_puts("ferry-guest: FAIL what=config working set and fill do not fit");
			con_kv("free", best_size);
			con_kv("size", cfg.size);
			con_kv("fill", fill);
			con_puts("\n");
			con_unlock();
			guest_exit(2);
		}
		cfg.region_size = ws;
		cfg.fill_base = best_base + ws;
		cfg.fill_pages = fill / 4096;
	} else if (cfg.size && cfg.size < best_size) cfg.region_size = cfg.size & ~0xfffUL;
	if (!fill && cfg.size > best_size) {
		con_lock();
		con_puts("ferry-guest: warning size larger than free RAM, using");
		con_kv("bytes", best_size);
		con_puts("\n");
		con_unlock();
	}
	cfg.size = cfg.region_size;
}

/* ---- SMP ---- */

static void cpu_common(u32 cpu) {
	load_tables(cpu);
	enable_simd();
	lapic_init(apic_hz);
	__atomic_add_fetch(&cpus_online, 1, __ATOMIC_SEQ_CST);
	while (!go_user) cpu_relax();
	enter_user((u64)user_main, (u64)&ustacks[cpu][USTACK_SIZE], cpu);
}

void ap_main(u32 idx) {
	(void)idx;
	cpu_common(cpu_index());
}

static void delay_us(u64 us) {
	u64 until = rdtsc() + cfg.tsc_khz * us / 1000;
	while (rdtsc() < until) cpu_relax();
}

static u32 count_mp_cpus(void) {
	/* Intel MP floating pointer in the EBDA or the BIOS area. */
	static const u64 ranges[2][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}};
	for (int r = 0; r < 2; r++)
		for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16) {
			const u8 *p = (const u8 *)a;
			if (p[0] != '_' || p[1] != 'M' || p[2] != 'P' || p[3] != '_') continue;
			const u8 *t = (const u8 *)(u64)*(const u32 *)(p + 4);
			if (!t || t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P') return 0;
			u16 count = *(const u16 *)(t + 34);
			const u8 *e = t + 44;
			u32 n = 0;
			for (u16 i = 0; i < count; i++) {
				if (e[0] == 0) { if (e[3] & 1) n++; e += 20; }
				else e += 8;
			}
			return n;
		}
	return 0;
}

static void start_aps(void) {
	u32 want = cfg.expect_cpus ? cfg.expect_cpus : count_mp_cpus();
	if (want == 1) return;
	kmemcpy((void *)TRAMP_BASE, tramp_start, (u64)(tramp_end - tramp_start));
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	*(u32 *)(TRAMP_BASE + (tramp_cr3 - tramp_start)) = (u32)cr3;
	/* INIT, then two SIPIs, to all but self. */
	lapic_write(0x300, 0x000c4500);
	delay_us(10000);
	for (int i = 0; i < 2; i++) {
		lapic_write(0x300, 0x000c4600 | (TRAMP_BASE >> 12));
		delay_us(200);
	}
	/* Wait for them: for the expected number, or until none arrived for a while. */
	u64 limit = want ? 2000 : 200; /* ms */
	u64 start = rdtsc(), last = cpus_online, last_change = start;
	for (;;) {
		u64 now = rdtsc();
		if (want && cpus_online >= want) break;
		if (cpus_online != last) { last = cpus_online; last_change = now; }
		if (now - start > limit * cfg.tsc_khz) break;
		if (!want && cpus_online > 1 && now - last_change > 50 * cfg.tsc_khz) break;
		cpu_relax();
	}
}

void kmain(u32 si_paddr) {
	struct hvm_start_info *si = (void *)(u64)si_paddr;
	if (si->magic != 0x336ec578) {
		con_puts("ferry-guest: EXCEPTION bad PVH start_info magic\n");
		guest_exit(0xfd);
	}
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;
		u64 i = 0;
		for (; i < sizeof(cmdline) - 1 && c[i]; i++) cmdline[i] = c[i];
		cmdline[i] = 0;
	}
	cfg.boot_tsc = rdtsc();
	parse_cmdline();
	build_tables();
	map_high_and_pick_region(si);
	calibrate();
	cpus_online = 0;
	load_tables(0);
	enable_simd();
	lapic_init(apic_hz);
	cpus_online = 1;
	start_aps();
	cfg.ncpus = cpus_online;
	con_lock();
	con_puts("ferry-guest: boot");
	con_kv("cpus", cfg.ncpus);
	con_kv("tsc_khz", cfg.tsc_khz);
	con_kv("apic_hz", apic_hz);
	con_kv("avx", (u64)cfg.have_avx);
	con_kvx("region", cfg.region_base);
	con_kv("region_mb", cfg.region_size >> 20);
	con_kv("boot_ms", (rdtsc() - cfg.boot_tsc) / cfg.tsc_khz);
	con_puts(" cmdline=\"");
	con_puts(cmdline);
	con_puts("\"");
	if (cfg.fill_pages) {
		con_kvx("fill_base", cfg.fill_base);
		con_kv("fill_pages", cfg.fill_pages);
	}
	con_puts("\n");
	con_unlock();
	go_user = 1;
	enter_user((u64)user_main, (u64)&ustacks[0][USTACK_SIZE], 0);
}
