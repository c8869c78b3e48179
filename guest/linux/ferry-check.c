/*
 * ferry-check: the Linux test guest's own judge of its health, before,
 * during and after a live migration. A static program in the initramfs
 * that scripts/linux-guest.sh builds; /init runs it when the kernel
 * command line has ferry.check=... (docs/linux-guests.md, "The checker").
 *
 * It owns, inside the guest:
 *   memory  a working set of size= bytes, split among threads= worker
 *           threads (one per online CPU, pinned), rewritten at rate= with
 *           pattern=, every page verified against a generation table
 *           before it is rewritten, and all of it once more at the end;
 *   clocks  CLOCK_MONOTONIC and CLOCK_REALTIME read by every worker at
 *           every step: neither may go backwards, and the longest gap
 *           between two reads is the stall the guest saw;
 *   kernel  the kernel log (/dev/kmsg), read from its start all the time,
 *           for what a broken migration leaves there (kernel_rules);
 *   files   optionally a seeded file in /tmp, re-read every few seconds;
 *   output  the test guest's line protocol on stdout (docs/guest.md,
 *           "Output protocol"; parsed by internal/guestlog), one write(2)
 *           per line so lines of different threads never mix.
 * Self-tests damage on purpose, to show the checks work: corrupt_after=
 * (memory, file), kmsg_test=1 (kernel log), clock_test=1 (realtime).
 *
 * Threads: the workers (memory, clocks, heartbeats), one kmsg reader, and
 * the main thread (signals, deadlines, files, the final verification).
 * Exit status: 0 no errors, 1 errors, 2 bad arguments or set-up failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

typedef unsigned long long u64;
typedef long long i64;
typedef uint32_t u32;

#define PAGE 4096ULL
#define WORDS (PAGE / 8)
#define NS 1000000000LL
#define MS 1000000LL
#define MAX_THREADS 256
#define MAX_FAIL_LINES 50        /* per reporter (a worker, kmsg, files); errors keep counting */
#define CHUNK_MAX 256            /* pages per write pass */
#define SLEEP_MAX_NS (10 * MS)   /* a waiting worker reads its clocks at least this often */
#define FILE_CHECK_NS (2 * NS)   /* files=: re-read the file this often */
#define FILE_PATH "/tmp/ferry-check.dat"
#define OUT_MAX 1024             /* longest output line */
#define MSG_MAX 240              /* longest kernel message quoted in a FAIL line */

/* ---- configuration ---------------------------------------------------- */

enum pattern { P_SEQ, P_RANDOM, P_HOTCOLD };

static struct {
	u64 size, rate, files, seed;
	i64 hb_ns, exit_ns, corrupt_ns; /* exit_ns, corrupt_ns: 0 = never */
	unsigned threads;               /* 0 = one per online CPU */
	enum pattern pattern;
	int kmsg, kmsg_test, clock_test;
	char args[512];                 /* argv as given, for the boot line */
} cfg = {.size = 16 << 20, .seed = 1, .hb_ns = 100 * MS, .kmsg = 1};

static const char *const pattern_names[] = {"seq", "random", "hotcold"};

/* ---- output ----------------------------------------------------------- */

struct out {
	size_t n;
	char b[OUT_MAX];
};

/* out_vadd: append to the line, truncating it rather than overflowing. */
static void out_vadd(struct out *o, const char *fmt, va_list ap) {
	size_t room = sizeof o->b - 1 - o->n; /* keep one byte for the newline */
	int r = vsnprintf(o->b + o->n, room, fmt, ap);
	if (r > 0) o->n += (size_t)r < room ? (size_t)r : room - 1;
}

static void out_add(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out_add(struct out *o, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	out_vadd(o, fmt, ap);
	va_end(ap);
}

/* out_emit: the line and its newline in one write(2). */
static void out_emit(struct out *o) {
	o->b[o->n++] = '\n';
	for (size_t off = 0; off < o->n;) {
		ssize_t r = write(1, o->b + off, o->n - off);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) break;
		off += (size_t)r;
	}
	o->n = 0;
}

/* say: print one whole line. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
	struct out o = {0};
	va_list ap;
	va_start(ap, fmt);
	out_vadd(&o, fmt, ap);
	va_end(ap);
	out_emit(&o);
}

/* clean: copy s for a "quoted" field: no quotes, no control characters. */
static void clean(char *dst, size_t max, const char *s, size_t n) {
	size_t i = 0;
	for (; i < n && i + 1 < max && s[i]; i++) {
		char c = s[i];
		dst[i] = c == '"' ? '\'' : (unsigned char)c < 0x20 || c == 0x7f ? '?' : c;
	}
	dst[i] = 0;
}

/* fail_begin: count one error and start a FAIL line, unless this
 * reporter has printed its MAX_FAIL_LINES already (then returns 0). */
static int fail_begin(struct out *o, u64 *errors, u64 *reported) {
	__atomic_add_fetch(errors, 1, __ATOMIC_RELAXED);
	if ((*reported)++ >= MAX_FAIL_LINES) return 0;
	o->n = 0;
	out_add(o, "ferry-guest: FAIL");
	return 1;
}

/* config_fail: a FAIL what=config line, and exit status 2. */
static void config_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void config_fail(const char *fmt, ...) {
	struct out o = {0};
	out_add(&o, "ferry-guest: FAIL what=config ");
	va_list ap;
	va_start(ap, fmt);
	out_vadd(&o, fmt, ap);
	va_end(ap);
	out_emit(&o);
	exit(2);
}

/* ---- small helpers ---------------------------------------------------- */

static i64 now_ns(clockid_t c) {
	struct timespec t;
	clock_gettime(c, &t);
	return (i64)t.tv_sec * NS + t.tv_nsec;
}

static i64 start_ns; /* CLOCK_MONOTONIC when the program started */

static i64 since_start_ms(i64 now) { return (now - start_ns) / MS; }

static u64 mix64(u64 x) { /* splitmix64's finaliser */
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static u64 xorshift(u64 *s) {
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void sleep_ns(i64 d) {
	struct timespec t = {d / NS, d % NS};
	while (nanosleep(&t, &t) < 0 && errno == EINTR) {}
}

static int stopping; /* set by the main thread: workers finish */

static int should_stop(int *flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }

/* ---- argument parsing ------------------------------------------------- */

/* parse_size: "4096", "64K", "16M", "1G", "1T" (binary units). */
static int parse_size(const char *s, u64 *v) {
	char *end;
	errno = 0;
	u64 n = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-') return 0;
	int shift = 0;
	switch (*end) {
	case 0: break;
	case 'k': case 'K': shift = 10; break;
	case 'm': case 'M': shift = 20; break;
	case 'g': case 'G': shift = 30; break;
	case 't': case 'T': shift = 40; break;
	default: return 0;
	}
	if (*end && end[1]) return 0;
	if (shift && n > (~0ULL >> shift)) return 0;
	*v = n << shift;
	return 1;
}

/* parse_dur: "250ms", "5s", "2m", "1h"; a bare number is seconds. */
static int parse_dur(const char *s, i64 *ns) {
	char *end;
	errno = 0;
	u64 n = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-' || n > 1000000000ULL) return 0;
	i64 unit;
	if (!*end || !strcmp(end, "s")) unit = NS;
	else if (!strcmp(end, "ms")) unit = MS;
	else if (!strcmp(end, "m")) unit = 60 * NS;
	else if (!strcmp(end, "h")) unit = 3600 * NS;
	else return 0;
	if (n > (u64)(INT64_MAX / unit)) return 0;
	*ns = (i64)n * unit;
	return 1;
}

static int parse_pattern(const char *s, enum pattern *p) {
	for (int i = 0; i < 3; i++)
		if (!strcmp(s, pattern_names[i])) return *p = (enum pattern)i, 1;
	return 0;
}

static int parse_flag(const char *s, int *f) {
	if (strcmp(s, "0") && strcmp(s, "1")) return 0;
	*f = *s == '1';
	return 1;
}

/* parse_arg: one key=value argument; 0 if unknown or malformed. */
static int parse_arg(const char *key, const char *v) {
	u64 n;
	if (!strcmp(key, "size")) return parse_size(v, &cfg.size);
	if (!strcmp(key, "rate")) return parse_size(v, &cfg.rate);
	if (!strcmp(key, "files")) return parse_size(v, &cfg.files);
	if (!strcmp(key, "seed")) return parse_size(v, &cfg.seed);
	if (!strcmp(key, "pattern")) return parse_pattern(v, &cfg.pattern);
	if (!strcmp(key, "hb")) return parse_dur(v, &cfg.hb_ns);
	if (!strcmp(key, "exit_after")) return parse_dur(v, &cfg.exit_ns);
	if (!strcmp(key, "corrupt_after")) return parse_dur(v, &cfg.corrupt_ns) && cfg.corrupt_ns > 0;
	if (!strcmp(key, "kmsg")) return parse_flag(v, &cfg.kmsg);
	if (!strcmp(key, "kmsg_test")) return parse_flag(v, &cfg.kmsg_test);
	if (!strcmp(key, "clock_test")) return parse_flag(v, &cfg.clock_test);
	if (!strcmp(key, "threads")) {
		if (!parse_size(v, &n) || n < 1 || n > MAX_THREADS) return 0;
		cfg.threads = (unsigned)n;
		return 1;
	}
	return 0;
}

static void parse_args(int argc, char **argv) {
	size_t used = 0;
	for (int i = 1; i < argc; i++) {
		char arg[128], quoted[128];
		clean(quoted, sizeof quoted, argv[i], strlen(argv[i]));
		if (strlen(argv[i]) >= sizeof arg) config_fail("arg=\"%s\" reason=\"too long\"", quoted);
		strcpy(arg, argv[i]);
		char *eq = strchr(arg, '=');
		if (!eq) config_fail("arg=\"%s\" reason=\"not key=value\"", quoted);
		*eq = 0;
		if (!parse_arg(arg, eq + 1)) config_fail("arg=\"%s\" reason=\"unknown or malformed\"", quoted);
		int r = snprintf(cfg.args + used, sizeof cfg.args - used, "%s%s", used ? " " : "", quoted);
		if (r > 0) used += (size_t)r < sizeof cfg.args - used ? (size_t)r : sizeof cfg.args - used - 1;
	}
}

/* ---- CPUs and bounds -------------------------------------------------- */

static int cpu_list[CPU_SETSIZE], ncpus; /* the CPUs this process may run on */

static void find_cpus(void) {
	cpu_set_t set;
	if (sched_getaffinity(0, sizeof set, &set) == 0)
		for (int c = 0; c < CPU_SETSIZE; c++)
			if (CPU_ISSET(c, &set)) cpu_list[ncpus++] = c;
	if (!ncpus) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		for (int c = 0; c < n && c < CPU_SETSIZE; c++) cpu_list[ncpus++] = c;
	}
	if (!ncpus) cpu_list[ncpus++] = 0;
}

/* mem_available: MemAvailable from /proc/meminfo, in bytes (0 if unknown). */
static u64 mem_available(void) {
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	u64 kb = 0;
	while (f && fgets(line, sizeof line, f))
		if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
	if (f) fclose(f);
	return kb << 10;
}

/* check_bounds: refuse what cannot work or would only take the guest
 * down (the kernel's OOM killer is no test result). */
static void check_bounds(void) {
	if (!cfg.threads) cfg.threads = ncpus < MAX_THREADS ? (unsigned)ncpus : MAX_THREADS;
	u64 avail = mem_available(), limit = avail / 4 * 3;
	if (cfg.size < cfg.threads * PAGE)
		config_fail("size=%llu threads=%u reason=\"size below one page per thread\"", cfg.size, cfg.threads);
	if (cfg.size > (1ULL << 40) || cfg.files > (1ULL << 40))
		config_fail("size=%llu files=%llu reason=\"above 1T\"", cfg.size, cfg.files);
	if (avail && cfg.size + cfg.files > limit)
		config_fail("size=%llu files=%llu avail=%llu reason=\"size+files above 3/4 of MemAvailable\"",
			    cfg.size, cfg.files, avail);
	if (cfg.hb_ns < 10 * MS || cfg.hb_ns > 60 * NS)
		config_fail("hb_ms=%lld reason=\"hb outside 10ms..60s\"", cfg.hb_ns / MS);
	if (cfg.rate > (1ULL << 40)) config_fail("rate=%llu reason=\"rate above 1T/s\"", cfg.rate);
	if (cfg.exit_ns > 7 * 24 * 3600 * NS) config_fail("exit_after_s=%lld reason=\"above 7 days\"", cfg.exit_ns / NS);
}

/* ---- memory: the working set ------------------------------------------ */

/* Word k of working-set page pg (counted from the start of the mapping,
 * all threads together) after its g-th write (g >= 1, wrapping to 1) is
 * word0(pg, g) + k, as in the test guest's dirty check=1. seed does not
 * enter it: it only chooses pages (pattern=random/hotcold) and the file. */
static inline u64 word0(u64 pg, u32 g) { return (pg << 32) | g; }

static unsigned char *region; /* the working set */
static u32 *gens;             /* generation per page, 0 = never written */
static u64 npages;

static u64 *page_words(u64 pg) { return (u64 *)(region + pg * PAGE); }

static void *map_anon(u64 bytes) {
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void setup_region(void) {
	npages = cfg.size / PAGE;
	region = map_anon(npages * PAGE);
	gens = map_anon((npages * sizeof *gens + PAGE - 1) / PAGE * PAGE);
	if (!region || !gens) config_fail("size=%llu reason=\"mmap: %s\"", cfg.size, strerror(errno));
}

/* gpa_of: the guest-physical address behind a virtual one, from
 * /proc/self/pagemap (root sees frame numbers); 0 if unknown. */
static u64 gpa_of(const void *va) {
	u64 e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) return 0;
	ssize_t r = pread(fd, &e, sizeof e, (off_t)((uintptr_t)va / PAGE * 8));
	close(fd);
	u64 pfn = e & ((1ULL << 55) - 1);
	if (r != sizeof e || !(e >> 63) || !pfn) return 0;
	return pfn * PAGE + (uintptr_t)va % PAGE;
}

/* ---- workers ---------------------------------------------------------- */

struct worker {
	unsigned id;
	int cpu;                    /* pinned to, or -1 */
	u64 first, pages;           /* global page range of its slice */
	u64 pos, rng;
	u64 seq, interval_pages, checked;
	u64 mem_errors, clock_errors, reported;
	i64 last_mono, last_real;   /* clock check */
	i64 gap, max_gap;           /* longest gap between two monotonic reads: this beat, all run */
	i64 worst;                  /* longest write pass this beat */
	i64 last_beat, next_beat;
	pthread_t th;
};

static struct worker workers[MAX_THREADS];
static unsigned filled; /* workers done writing their slice once */

static u64 worker_errors(struct worker *w) {
	return __atomic_load_n(&w->mem_errors, __ATOMIC_RELAXED) + __atomic_load_n(&w->clock_errors, __ATOMIC_RELAXED);
}

/* mem_report: page pg of worker w no longer holds generation g from word
 * `from` on (the words before it matched): one FAIL line for the page,
 * with its first differing word and how many differ. */
static __attribute__((noinline, cold)) void mem_report(struct worker *w, u64 pg, u32 g, u64 from) {
	const u64 *q = page_words(pg), o = word0(pg, g);
	u64 first = WORDS, words = 0;
	for (u64 k = from; k < WORDS; k++)
		if (q[k] != o + k && !words++) first = k;
	if (!words) return;
	struct out l;
	if (!fail_begin(&l, &w->mem_errors, &w->reported)) return;
	out_add(&l, " cpu=%u what=mem page=0x%llx gpa=0x%llx offset=0x%llx gen=%u expected=0x%llx found=0x%llx words=%llu va=%p",
		w->id, pg, gpa_of(&q[first]), first * 8, g, o + first, q[first], words, (void *)&q[first]);
	out_emit(&l);
}

/* page_rewrite: compare the page with generation g and write generation
 * ng over it, one 64-byte line at a time (each line compared just before
 * it is written). A line that differs goes to mem_report, which sees the
 * rest of the page still unwritten. */
static void page_rewrite(struct worker *w, u64 pg, u32 g, u32 ng) {
	u64 *q = page_words(pg), o = word0(pg, g), v = word0(pg, ng);
	u64 k = 0;
	for (; g && k < WORDS; k += 8) {
		u64 diff = 0;
		for (int i = 0; i < 8; i++) diff |= q[k + i] ^ (o + k + i);
		if (__builtin_expect(diff != 0, 0)) {
			mem_report(w, pg, g, k);
			break;
		}
		for (int i = 0; i < 8; i++) q[k + i] = v + k + i;
	}
	for (; k < WORDS; k++) q[k] = v + k;
}

static u64 next_page(struct worker *w) {
	switch (cfg.pattern) {
	case P_SEQ:
		if (++w->pos >= w->pages) w->pos = 0;
		return w->pos;
	case P_RANDOM:
		return xorshift(&w->rng) % w->pages;
	default: { /* hotcold: 90 % of writes to the hottest 10 % of pages */
		u64 r = xorshift(&w->rng), hot = w->pages / 10 ? w->pages / 10 : 1;
		return r % 10 ? (r >> 8) % hot : (r >> 8) % w->pages;
	}
	}
}

/* write_pass: rewrite `chunk` pages, each verified first. */
static void write_pass(struct worker *w, u64 chunk) {
	for (u64 j = 0; j < chunk; j++) {
		u64 pg = w->first + next_page(w);
		u32 g = gens[pg], ng = g + 1 ? g + 1 : 1;
		page_rewrite(w, pg, g, ng);
		if (g) w->checked++;
		gens[pg] = ng;
	}
	w->interval_pages += chunk;
}

static void clock_fail(struct worker *w, const char *which, i64 prev, i64 now) {
	struct out l;
	if (!fail_begin(&l, &w->clock_errors, &w->reported)) return;
	out_add(&l, " cpu=%u what=clock clock=%s prev=%lld now=%lld", w->id, which, prev, now);
	out_emit(&l);
}

/* clock_step: read both clocks; neither may go backwards. Returns
 * CLOCK_MONOTONIC, and keeps the longest gap between two reads. */
static i64 clock_step(struct worker *w) {
	i64 m = now_ns(CLOCK_MONOTONIC), r = now_ns(CLOCK_REALTIME);
	if (w->last_mono && m < w->last_mono) clock_fail(w, "monotonic", w->last_mono, m);
	else if (w->last_mono && m - w->last_mono > w->gap) w->gap = m - w->last_mono;
	if (w->last_real && r < w->last_real) clock_fail(w, "realtime", w->last_real, r);
	if (w->gap > w->max_gap) w->max_gap = w->gap;
	w->last_mono = m;
	w->last_real = r;
	return m;
}

/* beat: one hb line, for the interval since the last one. */
static void beat(struct worker *w, i64 now) {
	i64 dt = now - w->last_beat;
	u64 rate = dt > 0 ? (u64)((unsigned __int128)w->interval_pages * PAGE * NS / (u64)dt) : 0;
	struct out l = {0};
	out_add(&l, "ferry-guest: hb cpu=%u seq=%llu tsc=%llu ms=%lld pages=%llu rate=%llu worst_us=%lld checked=%llu errors=%llu gap_us=%lld",
		w->id, w->seq++, (u64)__rdtsc(), since_start_ms(now), w->interval_pages, rate, w->worst / 1000,
		w->checked, worker_errors(w), w->gap / 1000);
	out_emit(&l);
	w->interval_pages = 0;
	w->worst = w->gap = 0;
	w->last_beat = now;
	w->next_beat = now + cfg.hb_ns;
}

/* chunk_pages: a paced worker writes in passes of about a quarter of
 * what one heartbeat interval holds (1..CHUNK_MAX pages), so every beat
 * sees writes even at low rates. */
static u64 chunk_pages(u64 rate) {
	if (!rate) return CHUNK_MAX;
	u64 chunk = (u64)((unsigned __int128)rate * (u64)cfg.hb_ns / NS / PAGE / 4);
	return chunk < 1 ? 1 : chunk > CHUNK_MAX ? CHUNK_MAX : chunk;
}

/* wait_for: read the clocks and beat until `due` (or until stopping),
 * sleeping in between, at most SLEEP_MAX_NS at a time. */
static void wait_for(struct worker *w, i64 due) {
	for (;;) {
		i64 now = clock_step(w);
		if (now >= w->next_beat) beat(w, now);
		if (now >= due || should_stop(&stopping)) return;
		i64 until = due < w->next_beat ? due : w->next_beat;
		sleep_ns(until - now < SLEEP_MAX_NS ? until - now : SLEEP_MAX_NS);
	}
}

/* run: the write/verify loop, paced to this worker's share of rate=.
 * After a stall longer than a beat (a pause, a migration) it resumes the
 * pace instead of bursting to catch up. */
static void run(struct worker *w) {
	u64 rate = cfg.rate / cfg.threads;
	if (cfg.rate && !rate) rate = 1;
	u64 chunk = chunk_pages(rate);
	i64 chunk_ns = rate ? (i64)((unsigned __int128)chunk * PAGE * NS / rate) : 0;
	i64 due = clock_step(w);
	w->last_beat = due;
	w->next_beat = due + cfg.hb_ns;
	while (!should_stop(&stopping)) {
		i64 t0 = clock_step(w);
		write_pass(w, chunk);
		i64 t1 = clock_step(w);
		if (t1 - t0 > w->worst) w->worst = t1 - t0;
		if (rate) {
			due += chunk_ns;
			if (t1 > due + cfg.hb_ns) due = t1;
		}
		wait_for(w, due);
	}
}

static void pin(struct worker *w) {
	cpu_set_t set;
	int cpu = cpu_list[w->id % (unsigned)ncpus];
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	w->cpu = sched_setaffinity(0, sizeof set, &set) == 0 ? cpu : -1;
}

/* fill_slice: write every page of the slice once (generation 1), so every
 * later rewrite is checked and the working set is resident. */
static void fill_slice(struct worker *w) {
	for (u64 pg = w->first; pg < w->first + w->pages; pg++) {
		page_rewrite(w, pg, 0, 1);
		gens[pg] = 1;
	}
	__atomic_add_fetch(&filled, 1, __ATOMIC_RELEASE);
}

static void *worker_main(void *arg) {
	struct worker *w = arg;
	pin(w);
	char pinned[16] = "none";
	if (w->cpu >= 0) snprintf(pinned, sizeof pinned, "%d", w->cpu);
	say("ferry-guest: start cpu=%u workload=dirty base=0 pages=%llu first=0x%llx pin=%s", w->id, w->pages, w->first, pinned);
	fill_slice(w);
	run(w);
	return NULL;
}

static void start_workers(void) {
	for (unsigned i = 0; i < cfg.threads; i++) {
		struct worker *w = &workers[i];
		w->id = i;
		w->first = npages * i / cfg.threads;
		w->pages = npages * (i + 1) / cfg.threads - w->first;
		w->pos = w->pages - 1; /* seq starts at the slice's first page */
		w->rng = mix64(cfg.seed ^ ((u64)i << 40)) | 1;
		int e = pthread_create(&w->th, NULL, worker_main, w);
		if (e) config_fail("threads=%u reason=\"pthread_create: %s\"", cfg.threads, strerror(e));
	}
}

static void stop_workers(void) {
	__atomic_store_n(&stopping, 1, __ATOMIC_RELEASE);
	for (unsigned i = 0; i < cfg.threads; i++) pthread_join(workers[i].th, NULL);
}

/* page_verify: compare page pg of worker w with its generation, without
 * rewriting it; 1 if it differs (reported). */
static int page_verify(struct worker *w, u64 pg) {
	u32 g = gens[pg];
	const u64 *q = page_words(pg), o = word0(pg, g);
	u64 k = 0;
	if (!g) return 0;
	w->checked++;
	while (k < WORDS && q[k] == o + k) k++;
	if (k == WORDS) return 0;
	mem_report(w, pg, g, k);
	return 1;
}

/* final_verify: after the workers stopped, every page once more. */
static void final_verify(void) {
	i64 t0 = now_ns(CLOCK_MONOTONIC);
	u64 bad = 0;
	for (unsigned i = 0; i < cfg.threads; i++) {
		struct worker *w = &workers[i];
		for (u64 pg = w->first; pg < w->first + w->pages; pg++) bad += (u64)page_verify(w, pg);
	}
	i64 t1 = now_ns(CLOCK_MONOTONIC);
	say("ferry-guest: final pages=%llu bad=%llu ms=%lld took_us=%lld", npages, bad, since_start_ms(t1), (t1 - t0) / 1000);
}

/* ---- kernel log ------------------------------------------------------- */

/* What a broken migration (lost or stale memory, clocks jumping or
 * standing still, vCPUs not run) leaves in the kernel log. A record
 * matches a rule when it contains `needle` and, if set, `also`
 * (case-sensitive); the first matching rule names it, so specific rules
 * come before generic ones. rcu_sched/rcu_preempt (the RCU flavour's
 * name) appear in the log only in stall and kthread-starvation reports. */
static const struct rule {
	const char *name, *needle, *also;
} kernel_rules[] = {
	{"rcu_stall", "self-detected stall", NULL},   /* rcu: INFO: rcu_preempt self-detected stall on CPU */
	{"rcu_stall", "detected stalls", NULL},       /* rcu: INFO: rcu_sched detected stalls on CPUs/tasks: */
	{"rcu_stall", "detected expedited stalls", NULL},
	{"rcu_stall", "rcu_sched", NULL},
	{"rcu_stall", "rcu_preempt", NULL},
	{"soft_lockup", "soft lockup", NULL},         /* watchdog: BUG: soft lockup - CPU#0 stuck for 22s! */
	{"hard_lockup", "hard LOCKUP", NULL},
	{"hung_task", "hung_task", NULL},
	{"hung_task", "blocked for more than", NULL}, /* INFO: task X:1 blocked for more than 120 seconds. */
	{"clocksource", "Marking clocksource", NULL}, /* ... Marking clocksource 'tsc' as unstable because the skew is too large */
	{"clocksource", "Marking TSC unstable", NULL},
	{"clocksource", "clocksource", "unstable"},
	{"bug", "BUG:", NULL},
	{"warning", "WARNING:", NULL},
	{"oops", "Oops", NULL},
	{"gpf", "general protection fault", NULL},
	{"panic", "Kernel panic", NULL},
};

/* Known-harmless boot noise: ignored in records logged before the checker
 * started, reported like any other match after that.
 *  - QEMU TCG with more than one vCPU: the vCPUs' TSCs are not in step, and
 *    the kernel's TSC sync check at CPU bring-up says "tsc: Marking TSC
 *    unstable due to TSCs unsynchronized". Only bringing a CPU up (boot,
 *    hot-plug) runs that check; a migration cannot print it.
 *  - AMD CPU models (the lab's EPYC hosts): the boot-time advisory
 *    "Speculative Return Stack Overflow: WARNING: See ... for mitigation
 *    options." about a CPU vulnerability, printed once while the kernel
 *    picks its mitigations.
 * A clean boot of Debian's cloud kernel under QEMU TCG prints nothing else
 * that matches (checked with -smp 1 and 2, -cpu max). */
static const char *const boot_noise[] = {
	"Marking TSC unstable due to TSCs unsynchronized",
	"Speculative Return Stack Overflow: WARNING",
};

static struct {
	u64 errors, reported, records;
	int stop;
	pthread_t th;
} kmsg;

static const struct rule *match_rule(const char *text) {
	for (size_t i = 0; i < sizeof kernel_rules / sizeof *kernel_rules; i++) {
		const struct rule *r = &kernel_rules[i];
		if (strstr(text, r->needle) && (!r->also || strstr(text, r->also))) return r;
	}
	return NULL;
}

static int boot_noise_at(const char *text, u64 ts_us) {
	if ((i64)ts_us * 1000 >= start_ns) return 0;
	for (size_t i = 0; i < sizeof boot_noise / sizeof *boot_noise; i++)
		if (strstr(text, boot_noise[i])) return 1;
	return 0;
}

static void kernel_fail(const char *rule, u64 ts_us, const char *text, size_t n) {
	char msg[MSG_MAX + 1];
	clean(msg, sizeof msg, text, n);
	struct out l;
	if (!fail_begin(&l, &kmsg.errors, &kmsg.reported)) return;
	out_add(&l, " what=kernel rule=%s ts_us=%llu msg=\"%s\"", rule, ts_us, msg);
	out_emit(&l);
}

/* kmsg_record: one /dev/kmsg record, "prio,seq,ts_us,flags[,...];text\n"
 * followed by " KEY=value" lines. */
static void kmsg_record(char *rec) {
	u64 prio, seq, ts_us;
	char *text = strchr(rec, ';');
	if (!text || sscanf(rec, "%llu,%llu,%llu", &prio, &seq, &ts_us) != 3) return;
	text++;
	char *nl = strchr(text, '\n');
	if (nl) *nl = 0;
	kmsg.records++;
	const struct rule *r = match_rule(text);
	if (r && !boot_noise_at(text, ts_us)) kernel_fail(r->name, ts_us, text, strlen(text));
}

/* kmsg_drain: every record not read yet. */
static void kmsg_drain(int fd) {
	static char buf[8192 + 1];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf - 1);
		if (n < 0 && errno == EINTR) continue;
		if (n < 0 && errno == EPIPE) { /* overwritten before we read them */
			say("ferry-guest: warning what=kmsg reason=\"records overwritten before they were read\"");
			continue;
		}
		if (n <= 0) return; /* EAGAIN: all read */
		buf[n] = 0;
		kmsg_record(buf);
	}
}

/* kmsg_main: read the log from its start, then as it grows, until told
 * to stop; then once more to the end. */
static void *kmsg_main(void *arg) {
	int fd = *(int *)arg;
	struct pollfd p = {.fd = fd, .events = POLLIN};
	for (;;) {
		int last = should_stop(&kmsg.stop);
		kmsg_drain(fd);
		if (last) break;
		poll(&p, 1, 100);
	}
	close(fd);
	return NULL;
}

static void start_kmsg(void) {
	static int fd;
	if (!cfg.kmsg) return;
	fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		/* A checker that cannot see the kernel log must not pass. */
		char why[128];
		snprintf(why, sizeof why, "cannot open /dev/kmsg: %s", strerror(errno));
		kernel_fail("unreadable", 0, why, strlen(why));
		cfg.kmsg = 0;
		return;
	}
	int e = pthread_create(&kmsg.th, NULL, kmsg_main, &fd);
	if (e) config_fail("reason=\"pthread_create: %s\"", strerror(e));
}

static void stop_kmsg(void) {
	if (!cfg.kmsg) return;
	__atomic_store_n(&kmsg.stop, 1, __ATOMIC_RELEASE);
	pthread_join(kmsg.th, NULL);
}

/* kmsg_test: put a soft-lockup report into the kernel log, to show that
 * the scan finds it (a test of the checker; it makes the run fail). */
static void kmsg_test(void) {
	static const char line[] = "<4>ferry-check kmsg_test: watchdog: BUG: soft lockup - CPU#0 stuck for 0s! [ferry-check:1]\n";
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, line, sizeof line - 1) < 0)
		say("ferry-guest: warning what=kmsg_test reason=\"%s\"", strerror(errno));
	if (fd >= 0) close(fd);
}

/* ---- files ------------------------------------------------------------ */

static struct {
	u64 errors, reported;
	int fd;
} file = {.fd = -1};

#define FILE_BLOCK 65536ULL

/* file_content: the bytes of block b (FILE_BLOCK bytes at b*FILE_BLOCK),
 * a pure function of seed and b. */
static void file_content(u64 b, u64 *words) {
	u64 s = mix64(cfg.seed ^ mix64(b + 1)) | 1;
	for (u64 i = 0; i < FILE_BLOCK / 8; i++) words[i] = xorshift(&s);
}

static u64 file_len(u64 b) {
	u64 off = b * FILE_BLOCK;
	return cfg.files - off < FILE_BLOCK ? cfg.files - off : FILE_BLOCK;
}

static void file_create(void) {
	static u64 words[FILE_BLOCK / 8];
	file.fd = open(FILE_PATH, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (file.fd < 0) config_fail("files=%llu reason=\"open %s: %s\"", cfg.files, FILE_PATH, strerror(errno));
	for (u64 b = 0; b * FILE_BLOCK < cfg.files; b++) {
		file_content(b, words);
		if (pwrite(file.fd, words, file_len(b), (off_t)(b * FILE_BLOCK)) != (ssize_t)file_len(b))
			config_fail("files=%llu reason=\"write %s: %s\"", cfg.files, FILE_PATH, errno ? strerror(errno) : "short");
	}
}

/* file_check: read the file back; blocks that differ are reported (first
 * differing byte, how many blocks) and rewritten, so each corruption
 * counts once. */
static void file_check(void) {
	static u64 want[FILE_BLOCK / 8], got[FILE_BLOCK / 8];
	u64 bad = 0, first = 0;
	for (u64 b = 0; b * FILE_BLOCK < cfg.files; b++) {
		u64 len = file_len(b);
		file_content(b, want);
		ssize_t r = pread(file.fd, got, len, (off_t)(b * FILE_BLOCK));
		if (r == (ssize_t)len && !memcmp(want, got, len)) continue;
		if (!bad++) {
			u64 i = 0;
			while (r > 0 && i < (u64)r && ((char *)want)[i] == ((char *)got)[i]) i++;
			first = b * FILE_BLOCK + i;
		}
		if (pwrite(file.fd, want, len, (off_t)(b * FILE_BLOCK)) != (ssize_t)len) {}
	}
	struct out l;
	if (bad && fail_begin(&l, &file.errors, &file.reported)) {
		out_add(&l, " what=file path=%s offset=0x%llx blocks=%llu", FILE_PATH, first, bad);
		out_emit(&l);
	}
}

/* ---- corrupt_after: a test of the checker ----------------------------- */

/* corrupt: flip a bit of a working-set word behind the workers' backs
 * (and, with files=, of a byte of the file): the checker must say FAIL. */
static void corrupt(void) {
	u64 pg = npages / 2, k = 3;
	__atomic_fetch_xor(&page_words(pg)[k], 1ULL << 8, __ATOMIC_RELAXED);
	say("ferry-guest: corrupt what=mem page=0x%llx offset=0x%llx", pg, k * 8);
	if (cfg.files) {
		unsigned char c;
		off_t off = (off_t)(cfg.files / 2);
		if (pread(file.fd, &c, 1, off) == 1) {
			c ^= 1;
			if (pwrite(file.fd, &c, 1, off) == 1) say("ferry-guest: corrupt what=file offset=0x%llx", (u64)off);
		}
	}
}

/* clock_test: step CLOCK_REALTIME back by a second, which every worker
 * must report. Only as a child of init (the guest's /init): never step
 * the clock of a host someone runs this on by hand. */
static void clock_test(void) {
	if (getppid() != 1) {
		say("ferry-guest: warning what=clock_test reason=\"not a child of init, clock left alone\"");
		return;
	}
	struct timespec t;
	clock_gettime(CLOCK_REALTIME, &t);
	t.tv_sec -= 1;
	if (clock_settime(CLOCK_REALTIME, &t) < 0)
		say("ferry-guest: warning what=clock_test reason=\"%s\"", strerror(errno));
	else
		say("ferry-guest: corrupt what=clock clock=realtime step_ms=-1000");
}

/* ---- main ------------------------------------------------------------- */

static void print_boot(void) {
	__builtin_cpu_init();
	say("ferry-guest: boot cpus=%d tsc_khz=0 apic_hz=0 avx=%d region=0 region_mb=%llu boot_ms=%lld cmdline=\"%s\" threads=%u pages=%llu files=%llu",
	    ncpus, __builtin_cpu_supports("avx") ? 1 : 0, cfg.size >> 20, now_ns(CLOCK_BOOTTIME) / MS, cfg.args,
	    cfg.threads, npages, cfg.files);
}

/* self_tests: corrupt_after= and clock_test=1, each once, when due and
 * every worker has written its slice. */
static void self_tests(i64 now) {
	static int corrupted, stepped;
	if (__atomic_load_n(&filled, __ATOMIC_ACQUIRE) != cfg.threads) return;
	if (cfg.corrupt_ns && !corrupted && now - start_ns >= cfg.corrupt_ns) {
		corrupt();
		corrupted = 1;
	}
	if (cfg.clock_test && !stepped && now - start_ns >= 2 * cfg.hb_ns) {
		clock_test(); /* the workers have read the clocks by now */
		stepped = 1;
	}
}

/* wait_for_stop: the main thread's loop until exit_after or a signal;
 * returns why it stopped. */
static const char *wait_for_stop(const sigset_t *sigs) {
	i64 next_file = start_ns + FILE_CHECK_NS;
	for (;;) {
		struct timespec t = {0, 50 * MS};
		int sig = sigtimedwait(sigs, NULL, &t);
		if (sig == SIGTERM) return "sigterm";
		if (sig == SIGUSR1) return "sigusr1";
		if (sig == SIGINT) return "sigint";
		i64 now = now_ns(CLOCK_MONOTONIC);
		if (cfg.exit_ns && now - start_ns >= cfg.exit_ns) return "exit_after";
		self_tests(now);
		if (cfg.files && now >= next_file) {
			file_check();
			next_file = now_ns(CLOCK_MONOTONIC) + FILE_CHECK_NS;
		}
	}
}

static int print_exit(const char *reason) {
	u64 mem = 0, clk = 0, checked = 0;
	i64 gap = 0;
	for (unsigned i = 0; i < cfg.threads; i++) {
		struct worker *w = &workers[i];
		mem += w->mem_errors;
		clk += w->clock_errors;
		checked += w->checked;
		if (w->max_gap > gap) gap = w->max_gap;
	}
	u64 errors = mem + clk + kmsg.errors + file.errors;
	say("ferry-guest: exit errors=%llu ms=%lld reason=%s mem=%llu clock=%llu kernel=%llu file=%llu checked=%llu max_gap_us=%lld kmsg_records=%llu",
	    errors, since_start_ms(now_ns(CLOCK_MONOTONIC)), reason, mem, clk, kmsg.errors, file.errors, checked,
	    gap / 1000, kmsg.records);
	return errors ? 1 : 0;
}

int main(int argc, char **argv) {
	start_ns = now_ns(CLOCK_MONOTONIC);
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGUSR1);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* every thread inherits it; main takes them */

	parse_args(argc, argv);
	find_cpus();
	check_bounds();
	setup_region();
	if (cfg.files) file_create();
	print_boot();
	start_kmsg();
	start_workers();
	if (cfg.kmsg_test) kmsg_test();

	const char *reason = wait_for_stop(&sigs);
	stop_workers();
	final_verify();
	if (cfg.files) file_check();
	stop_kmsg();
	int status = print_exit(reason);
	if (cfg.files) unlink(FILE_PATH);
	return status;
}
