/*
 * ferry test guest, CPL 3 part: the workloads. Runs natively under PVM.
 * Every CPU works on its own slice of the workload region and prints its
 * own lines (see docs/guest.md for the output protocol).
 */
#include "guest.h"

struct percpu {
	u64 base, pages;   /* this CPU's slice of the region */
	u64 table, table_pages; /* dirty check=1: generation table at the end of the slice */
	u64 fill_base, fill_pages, fill_first; /* its slice of the fill area; first fill page number */
	u64 hb_seq, next_hb, last_hb_tsc;
	u64 exit_tsc;
	u64 last_tsc;      /* for the TSC monotonicity check */
	u64 errors;
	u64 reported;      /* FAIL lines printed (capped) */
	u64 rng;
};

static struct percpu pc[MAX_CPUS];
static volatile u32 exited;
static volatile u32 fills_done, fills_checked;

#define MAX_FAIL_LINES 50

static u64 xorshift(u64 *s) {
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static u64 tsc_per_ms(void) { return cfg.tsc_khz; }

static void fail_line(u64 cpu, const char *what) {
	struct percpu *c = &pc[cpu];
	c->errors++;
	if (c->reported++ >= MAX_FAIL_LINES) return;
	con_lock();
	con_puts("ferry-guest: FAIL");
	con_kv("cpu", cpu);
	con_puts(" what=");
	con_puts(what);
}

static void fail_end(u64 cpu) {
	if (pc[cpu].reported > MAX_FAIL_LINES) return;
	con_puts("\n");
	con_unlock();
}

/* check_tsc: the TSC must never go backwards on a CPU, across migration
 * or save/restore included. */
static u64 check_tsc(u64 cpu) {
	u64 now = rdtsc();
	struct percpu *c = &pc[cpu];
	if (now < c->last_tsc) {
		fail_line(cpu, "tsc");
		if (c->reported <= MAX_FAIL_LINES) {
			con_kv("prev", c->last_tsc);
			con_kv("now", now);
		}
		fail_end(cpu);
	}
	c->last_tsc = now;
	return now;
}

static void check_fill(u64 cpu);

/* maybe_exit: honour exit_after=; the CPU that reaches it first reports
 * and exits the VM with status 0 when no CPU saw an error, 1 otherwise.
 * With fill_check=1 every CPU first checks its slice of the fill area, and
 * the reporting CPU waits for all of them. */
static void maybe_exit(u64 cpu, u64 now) {
	if (!cfg.exit_ms || now < pc[cpu].exit_tsc) return;
	int checking = cfg.fill_check && cfg.fill_pages;
	if (checking) {
		check_fill(cpu);
		__atomic_add_fetch(&fills_checked, 1, __ATOMIC_SEQ_CST);
	}
	if (__atomic_exchange_n(&exited, 1, __ATOMIC_SEQ_CST)) {
		for (;;) sys_idle();
	}
	if (checking) {
		while (__atomic_load_n(&fills_checked, __ATOMIC_SEQ_CST) < cfg.ncpus) cpu_relax();
		now = rdtsc();
	}
	u64 errs = 0;
	for (u32 i = 0; i < cfg.ncpus; i++) errs += pc[i].errors;
	con_lock();
	con_puts("ferry-guest: exit");
	con_kv("errors", errs);
	con_kv("ms", (now - cfg.boot_tsc) / tsc_per_ms());
	con_puts("\n");
	con_unlock();
	guest_exit(errs ? 1 : 0);
}

/* ---- idle ---- */

static void run_idle(u64 cpu) {
	struct percpu *c = &pc[cpu];
	u64 hb_ticks = cfg.hb_ms < 1000 ? 1000 : cfg.hb_ms; /* idle beats at most once a second */
	for (;;) {
		sys_idle();
		u64 now = check_tsc(cpu);
		maybe_exit(cpu, now);
		if (now >= c->next_hb) {
			con_lock();
			con_puts("ferry-guest: hb");
			con_kv("cpu", cpu);
			con_kv("seq", c->hb_seq++);
			con_kv("tsc", now);
			con_kv("ms", (now - cfg.boot_tsc) / tsc_per_ms());
			con_kv("pages", 0);
			con_kv("rate", 0);
			con_kv("worst_us", 0);
			con_puts("\n");
			con_unlock();
			c->next_hb = now + hb_ticks * tsc_per_ms();
		}
	}
}

/* ---- dirty: the shape of Appmembench ---- */

static u64 next_page(struct percpu *c, u64 *pos, u64 pages) {
	switch (cfg.pattern) {
	case P_SEQ:
		if (++*pos >= pages) *pos = 0;
		return *pos;
	case P_RANDOM:
		return xorshift(&c->rng) % pages;
	default: { /* hotcold: 90% of writes to the hottest 10% of pages */
		u64 r = xorshift(&c->rng);
		u64 hot = pages / 10 ? pages / 10 : 1;
		if (r % 10) return (r >> 8) % hot;
		return (r >> 8) % pages;
	}
	}
}

#define DIRTY_CHUNK 256 /* pages per write pass */

/* check=1: word k of working-set page pg (counted from cfg.region_base)
 * after its g-th write since boot (g >= 1) is dirty_word0(pg, g) + k. The
 * generation table (a u32 per data page, 0 = never written) makes a stale
 * page, one that missed its last write, differ from what is expected. */
static inline u64 dirty_word0(u64 pg, u32 g) { return (pg << 32) | g; }

/* dirty_report: the slow path of dirty_rewrite, which found that the
 * page's word `from` (the first of its line) on no longer matches
 * generation g: one FAIL line and one error for the page, with its first
 * differing word and how many differ (the words before `from` matched),
 * then the rest of the page is written for generation ng. */
static __attribute__((noinline, cold)) void dirty_report(u64 cpu, u64 *w, u64 pg, u32 g, u32 ng, u64 from) {
	u64 o = dirty_word0(pg, g), v = dirty_word0(pg, ng), first = 512, words = 0;
	for (u64 k = from; k < 512; k++)
		if (w[k] != o + k && !words++) first = k;
	if (words) {
		fail_line(cpu, "mem");
		if (pc[cpu].reported <= MAX_FAIL_LINES) {
			con_kvx("page", pg);
			con_kvx("gpa", (u64)&w[first]);
			con_kvx("offset", first * 8);
			con_kv("gen", g);
			con_kvx("expected", o + first);
			con_kvx("found", w[first]);
			con_kv("words", words);
		}
		fail_end(cpu);
	}
	for (u64 k = from; k < 512; k++) w[k] = v + k;
}

/* dirty_rewrite: every word of the page must still be what this CPU
 * wrote at generation g; it is compared, then rewritten for generation
 * ng, in one pass a 64-byte line at a time (each line compared before it
 * is written): one sweep over the page costs much less than a read pass
 * and a write pass. The first line that differs goes to dirty_report with
 * the rest of the page unwritten, so the report is the same. Not inlined:
 * its own registers keep the loop tight. */
static __attribute__((noinline)) void dirty_rewrite(u64 cpu, u64 *w, u64 pg, u32 g, u32 ng) {
	u64 o = dirty_word0(pg, g), v = dirty_word0(pg, ng);
	for (u64 k = 0; k < 512; k += 8, o += 8, v += 8) {
		u64 *q = w + k;
		u64 diff = (q[0] ^ o) | (q[1] ^ (o + 1)) | (q[2] ^ (o + 2)) | (q[3] ^ (o + 3)) |
			   (q[4] ^ (o + 4)) | (q[5] ^ (o + 5)) | (q[6] ^ (o + 6)) | (q[7] ^ (o + 7));
		if (__builtin_expect(diff != 0, 0)) {
			dirty_report(cpu, w, pg, g, ng, k);
			return;
		}
		q[0] = v, q[1] = v + 1, q[2] = v + 2, q[3] = v + 3;
		q[4] = v + 4, q[5] = v + 5, q[6] = v + 6, q[7] = v + 7;
	}
}

/* dirty_layout: with check=1 the last pages of the slice hold the
 * generation table, the rest are the pages the workload writes. */
static void dirty_layout(struct percpu *c) {
	c->table_pages = (c->pages * 4 + 4095) / 4096;
	if (c->pages <= c->table_pages) {
		con_lock();
		con_puts("ferry-guest: FAIL what=config size too small for dirty check=1\n");
		con_unlock();
		guest_exit(2);
	}
	c->table = c->base + (c->pages - c->table_pages) * 4096;
}

/* One dirty heartbeat: the pages written since the last one and the rate. */
static void dirty_beat(u64 cpu, u64 now, u64 *interval_pages, u64 *worst, int checking, u64 checked) {
	struct percpu *c = &pc[cpu];
	u64 dt = now - c->last_hb_tsc;
	u64 dt_us = dt * 1000 / cfg.tsc_khz;
	u64 bps = dt_us ? *interval_pages * 4096 * 1000000 / dt_us : 0;
	con_lock();
	con_puts("ferry-guest: hb");
	con_kv("cpu", cpu);
	con_kv("seq", c->hb_seq++);
	con_kv("tsc", now);
	con_kv("ms", (now - cfg.boot_tsc) / tsc_per_ms());
	con_kv("pages", *interval_pages);
	con_kv("rate", bps);
	con_kv("worst_us", *worst * 1000 / cfg.tsc_khz);
	if (checking) {
		con_kv("checked", checked);
		con_kv("errors", c->errors);
	}
	con_puts("\n");
	con_unlock();
	*interval_pages = 0;
	*worst = 0;
	c->last_hb_tsc = now;
	c->next_hb = now + cfg.hb_ms * tsc_per_ms();
}

static void run_dirty(u64 cpu) {
	struct percpu *c = &pc[cpu];
	u64 rate = cfg.rate / cfg.ncpus; /* this CPU's share, bytes/s */
	u64 pos = 0, stamp = 0;
	u64 interval_pages = 0, worst = 0;
	/* check=1: the data pages before the generation table. */
	u32 *gen = cfg.check ? (u32 *)c->table : 0;
	u64 npages = cfg.check ? c->pages - c->table_pages : c->pages;
	u64 first = (c->base - cfg.region_base) / 4096, checked = 0;
	/* check=1 first writes the whole slice once (generation 1) at full
	 * speed, before the first heartbeat: every later rewrite is then
	 * checked, and the working set is resident before anyone measures. */
	for (u64 p = 0; gen && p < npages; p++) {
		u64 *w = (u64 *)(c->base + p * 4096);
		u64 v = dirty_word0(first + p, 1);
		for (int k = 0; k < 512; k++) w[k] = v + (u64)k;
		gen[p] = 1;
	}
	/* A paced CPU writes in passes of about a quarter of what one
	 * heartbeat interval holds (at most DIRTY_CHUNK pages), so every beat
	 * sees writes even at low rates and the reported rate stays smooth. */
	u64 chunk = DIRTY_CHUNK;
	if (rate) {
		u64 per_beat = rate / 1000 * cfg.hb_ms / 4096;
		chunk = per_beat / 4;
		if (chunk > DIRTY_CHUNK) chunk = DIRTY_CHUNK;
		if (chunk < 1) chunk = 1;
	}
	u64 start = rdtsc();
	/* TSC ticks one pass may take at the target rate. */
	u64 chunk_ticks = rate ? chunk * 4096 * cfg.tsc_khz * 1000 / rate : 0;
	u64 due = start;
	c->last_hb_tsc = start;
	for (;;) {
		u64 t0 = rdtsc();
		if (gen) {
			/* check=1: verify the whole page while rewriting it with the
			 * next generation (pages never written are not checked). */
			for (u64 j = 0; j < chunk; j++) {
				u64 p = next_page(c, &pos, npages);
				u64 *w = (u64 *)(c->base + p * 4096);
				u32 g = gen[p], ng = g + 1 ? g + 1 : 1;
				if (g) {
					dirty_rewrite(cpu, w, first + p, g, ng);
					checked++;
				} else {
					u64 v = dirty_word0(first + p, ng);
					for (int k = 0; k < 512; k++) w[k] = v + (u64)k;
				}
				gen[p] = ng;
			}
		} else {
			for (u64 j = 0; j < chunk; j++) {
				u64 p = next_page(c, &pos, npages);
				/* A page write rewrites the whole page, so the rate the guest
				 * reports is real memory bandwidth and the page changes fully. */
				u64 *w = (u64 *)(c->base + p * 4096);
				u64 v = stamp++ ^ (p << 20);
				for (int k = 0; k < 512; k++) w[k] = v + (u64)k;
			}
		}
		u64 t1 = check_tsc(cpu);
		if (t1 - t0 > worst) worst = t1 - t0;
		interval_pages += chunk;
		if (rate) {
			/* Pace to the target rate, beating on time while waiting.
			 * After a long stall (a pause, a migration) do not burst to
			 * catch up: resume the pace. */
			due += chunk_ticks;
			if (t1 > due + cfg.hb_ms * tsc_per_ms()) due = t1;
		}
		for (;;) {
			u64 now = check_tsc(cpu);
			maybe_exit(cpu, now);
			if (now >= c->next_hb) dirty_beat(cpu, now, &interval_pages, &worst, gen != 0, checked);
			if (now >= due) break;
			cpu_relax();
		}
	}
}

/* ---- verify: the oracle every migration test relies on ---- */

/* Word i of page p (global page number) at generation g. */
static inline u64 expect_word(u64 p, u32 g, u64 i) { return mix((p << 32) ^ ((u64)g << 9) ^ i ^ cfg.seed); }

static void fill_page(u64 *w, u64 p, u32 g) {
	for (u64 i = 0; i < 512; i++) w[i] = expect_word(p, g, i);
}

static int check_page(u64 cpu, const u64 *w, u64 p, u32 g) {
	int bad = 0;
	for (u64 i = 0; i < 512; i++) {
		u64 want = expect_word(p, g, i);
		if (w[i] != want) {
			bad = 1;
			fail_line(cpu, "mem");
			if (pc[cpu].reported <= MAX_FAIL_LINES) {
				con_kvx("page", p);
				con_kvx("gpa", (u64)&w[i]);
				con_kvx("offset", i * 8);
				con_kv("gen", g);
				con_kvx("expected", want);
				con_kvx("found", w[i]);
			}
			fail_end(cpu);
		}
	}
	return bad;
}

static const char *reg_names[10] = {"rbx", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"};

static void soak_registers(u64 cpu, u64 round, u64 spins) {
	static u64 expect[MAX_CPUS][10 + 64], got[MAX_CPUS][10 + 64];
	u64 *e = expect[cpu], *g = got[cpu];
	for (int i = 0; i < 10 + 64; i++) {
		e[i] = mix((cpu << 56) ^ (round << 8) ^ (u64)i ^ cfg.seed);
		g[i] = 0;
	}
	reg_soak(e, g, spins, (u64)cfg.have_avx);
	for (int i = 0; i < 10 + 64; i++) {
		int vec = i >= 10, lane = (i - 10) % 4;
		if (vec && !cfg.have_avx && lane >= 2) continue; /* SSE only: low 128 bits */
		if (e[i] == g[i]) continue;
		fail_line(cpu, "reg");
		if (pc[cpu].reported <= MAX_FAIL_LINES) {
			con_puts(" reg=");
			if (!vec) con_puts(reg_names[i]);
			else {
				con_puts(cfg.have_avx ? "ymm" : "xmm");
				con_putdec((u64)(i - 10) / 4);
				con_puts(".q");
				con_putdec((u64)lane);
			}
			con_kv("round", round);
			con_kvx("expected", e[i]);
			con_kvx("found", g[i]);
		}
		fail_end(cpu);
	}
}

static void run_verify(u64 cpu) {
	struct percpu *c = &pc[cpu];
	/* Generation table first, data pages after it. */
	u32 *gen = (u32 *)c->base;
	u64 gen_pages = (c->pages * 4 + 4095) / 4096;
	if (c->pages <= gen_pages + 1) {
		con_lock();
		con_puts("ferry-guest: FAIL what=config size too small for verify\n");
		con_unlock();
		guest_exit(2);
	}
	u64 npages = c->pages - gen_pages;
	u64 data = c->base + gen_pages * 4096;
	u64 first = (c->base - cfg.region_base) / 4096; /* global page number base */
	for (u64 p = 0; p < npages; p++) {
		gen[p] = 0;
		fill_page((u64 *)(data + p * 4096), first + p, 0);
	}
	/* The register soak spins ~1 ms per round (about half the time): long
	 * enough that interrupts, pauses and migrations land inside it. */
	u64 spins = cfg.tsc_khz;
	u64 cursor = 0, passes = 0, checked = 0, mutated = 0, round = 0;
	c->last_hb_tsc = rdtsc();
	for (;;) {
		/* Mutate a few pages: a new generation each time. */
		for (int k = 0; k < 64; k++) {
			u64 p = xorshift(&c->rng) % npages;
			u32 g = gen[p] + 1;
			fill_page((u64 *)(data + p * 4096), first + p, g);
			gen[p] = g;
			mutated++;
		}
		/* Verify the next stretch of the sweep; a full sweep is a pass. */
		for (int k = 0; k < 1024; k++) {
			check_page(cpu, (const u64 *)(data + cursor * 4096), first + cursor, gen[cursor]);
			checked++;
			if (++cursor == npages) {
				cursor = 0;
				passes++;
			}
		}
		soak_registers(cpu, round++, spins);
		u64 now = check_tsc(cpu);
		maybe_exit(cpu, now);
		if (now >= c->next_hb) {
			con_lock();
			con_puts("ferry-guest: verify");
			con_kv("cpu", cpu);
			con_kv("seq", c->hb_seq++);
			con_kv("tsc", now);
			con_kv("ms", (now - cfg.boot_tsc) / tsc_per_ms());
			con_kv("passes", passes);
			con_kv("checked", checked);
			con_kv("mutated", mutated);
			con_kv("regs", round);
			con_kv("errors", c->errors);
			con_puts("\n");
			con_unlock();
			c->last_hb_tsc = now;
			c->next_hb = now + cfg.hb_ms * tsc_per_ms();
		}
	}
}

/* ---- fill: memory the workloads never touch again ---- */

/* run_fill: write this CPU's slice of the fill area, report it, and wait
 * until every CPU has filled its slice, so that all fill lines come before
 * any start line. */
static void run_fill(u64 cpu) {
	struct percpu *c = &pc[cpu];
	u64 t0 = rdtsc();
	for (u64 p = 0; p < c->fill_pages; p++) fill_content((u64 *)(c->fill_base + p * 4096), c->fill_first + p);
	u64 t1 = rdtsc();
	con_lock();
	con_puts("ferry-guest: fill");
	con_kv("cpu", cpu);
	con_kvx("base", c->fill_base);
	con_kv("pages", c->fill_pages);
	con_puts(" content=");
	con_puts(content_name(cfg.content));
	con_kv("ms", (t1 - cfg.boot_tsc) / tsc_per_ms());
	con_kv("took_us", (t1 - t0) * 1000 / cfg.tsc_khz);
	con_puts("\n");
	con_unlock();
	__atomic_add_fetch(&fills_done, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&fills_done, __ATOMIC_SEQ_CST) < cfg.ncpus) cpu_relax();
}

/* check_fill: regenerate every page of this CPU's fill slice and compare;
 * one FAIL line (and one error) per page that differs. */
static void check_fill(u64 cpu) {
	static u64 want[MAX_CPUS][512];
	struct percpu *c = &pc[cpu];
	u64 *e = want[cpu], bad = 0, t0 = rdtsc();
	for (u64 p = 0; p < c->fill_pages; p++) {
		const u64 *w = (const u64 *)(c->fill_base + p * 4096);
		u64 f = c->fill_first + p, diff = 0, first = 0;
		fill_content(e, f);
		for (u64 i = 0; i < 512; i++)
			if (w[i] != e[i] && !diff++) first = i;
		if (!diff) continue;
		bad++;
		fail_line(cpu, "fill");
		if (c->reported <= MAX_FAIL_LINES) {
			con_kvx("page", f);
			con_kvx("gpa", (u64)&w[first]);
			con_kvx("offset", first * 8);
			con_puts(" content=");
			con_puts(content_name(fill_class(f)));
			con_kvx("expected", e[first]);
			con_kvx("found", w[first]);
			con_kv("words", diff);
		}
		fail_end(cpu);
	}
	u64 t1 = rdtsc();
	con_lock();
	con_puts("ferry-guest: fillcheck");
	con_kv("cpu", cpu);
	con_kvx("base", c->fill_base);
	con_kv("pages", c->fill_pages);
	con_kv("bad", bad);
	con_kv("ms", (t1 - cfg.boot_tsc) / tsc_per_ms());
	con_kv("took_us", (t1 - t0) * 1000 / cfg.tsc_khz);
	con_puts("\n");
	con_unlock();
}

void user_main(u64 cpu) {
	struct percpu *c = &pc[cpu];
	u64 slice = (cfg.region_size / cfg.ncpus) & ~0xfffUL;
	c->base = cfg.region_base + cpu * slice;
	c->pages = slice / 4096;
	/* Fill pages split as evenly as they go: the first CPUs take one more. */
	u64 share = cfg.fill_pages / cfg.ncpus, extra = cfg.fill_pages % cfg.ncpus;
	c->fill_first = cpu * share + (cpu < extra ? cpu : extra);
	c->fill_pages = share + (cpu < extra ? 1 : 0);
	c->fill_base = cfg.fill_base + c->fill_first * 4096;
	c->rng = mix(cfg.seed ^ (cpu + 1)) | 1;
	c->exit_tsc = cfg.boot_tsc + cfg.exit_ms * tsc_per_ms();
	if (c->pages == 0 && cfg.workload != W_IDLE) {
		con_lock();
		con_puts("ferry-guest: FAIL what=config no memory for the workload\n");
		con_unlock();
		guest_exit(2);
	}
	if (cfg.workload == W_DIRTY && cfg.check) dirty_layout(c);
	if (cfg.fill_pages) run_fill(cpu);
	c->last_tsc = rdtsc();
	c->next_hb = c->last_tsc + cfg.hb_ms * tsc_per_ms();
	con_lock();
	con_puts("ferry-guest: start");
	con_kv("cpu", cpu);
	con_puts(cfg.workload == W_DIRTY ? " workload=dirty" : cfg.workload == W_VERIFY ? " workload=verify" : " workload=idle");
	con_kvx("base", c->base);
	con_kv("pages", c->pages);
	if (c->table_pages) {
		con_kvx("table", c->table);
		con_kv("table_pages", c->table_pages);
	}
	con_puts("\n");
	con_unlock();
	switch (cfg.workload) {
	case W_DIRTY: run_dirty(cpu); break;
	case W_VERIFY: run_verify(cpu); break;
	default: run_idle(cpu);
	}
}
