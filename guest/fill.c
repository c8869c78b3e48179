/*
 * ferry test guest: content of the fill area (fill=, content=; see
 * docs/guest.md). Page f of the fill area (counted from its first page,
 * independent of how the area is split among CPUs) is a pure function of
 * (seed, content, f): a CPU can regenerate any page to check it, and the
 * same command line always gives the same memory.
 *
 *   text    English-like words in sentences and 72-column lines
 *   repeat  one of REPEAT_IMAGES distinct page images (random bytes, so
 *           only deduplication, not per-page compression, gains)
 *   random  incompressible
 *   zero    written, but all zero
 *   mixed   by page: 40 % text, 20 % repeat, 20 % random, 20 % zero
 */
#include "guest.h"

#define REPEAT_IMAGES 16
#define LINE_COLS 72

/* Common English words, most frequent first: word_pick favours the front.
 * Fixed 16-byte slots, zero padded, so a word is two loads and two stores. */
static const char words[][16] = {
	"the", "of", "and", "to", "a", "in", "is", "it", "that", "was", "for", "on", "are", "with", "as", "be",
	"at", "by", "this", "have", "from", "or", "one", "had", "not", "but", "what", "all", "were", "when", "we",
	"there", "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how", "up",
	"out", "them", "then", "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her",
	"two", "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who", "now",
	"people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water", "long",
	"little", "very", "after", "words", "called", "just", "where", "most", "know", "get", "through", "back",
	"much", "before", "go", "good", "new", "write", "our", "used", "me", "man", "too", "any", "day", "same",
	"right", "look", "think", "also", "around", "another", "came", "come", "work", "three", "word", "must",
	"because", "does", "part", "even", "place", "well", "such", "here", "take", "why", "things", "help", "put",
	"years", "different", "away", "again", "off", "went", "old", "number", "great", "tell", "men", "say",
	"small", "every", "found", "still", "between", "name", "should", "home", "big", "give", "air", "line",
	"set", "own", "under", "read", "last", "never", "us", "left", "end", "along", "while", "might", "next",
	"sound", "below", "saw", "something", "thought", "both", "few", "those", "always", "show", "large",
	"often", "together", "asked", "house", "world", "going", "want", "school", "important", "until", "form",
	"food", "keep", "children", "feet", "land", "side", "without", "boy", "once", "animal", "life", "enough",
	"took", "sometimes", "four", "head", "above", "kind", "began", "almost", "live", "page", "got", "earth",
	"need", "far", "hand", "high", "year", "mother", "light", "country", "father", "let", "night", "picture",
	"being", "study", "second", "soon", "story", "since", "white", "ever", "paper", "hard", "near", "sentence",
	"better", "best", "across", "during", "today", "however", "sure", "knew", "try", "told", "young", "sun",
	"memory", "machine", "river", "mountain", "question", "answer", "system", "morning", "problem", "north",
};
#define NWORDS (sizeof(words) / sizeof(words[0]))

static u64 xorshift(u64 *s) {
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Key of page f for one purpose: every class draws from its own stream. */
static u64 page_key(u64 f, u64 tag) { return mix(mix(cfg.seed ^ (tag << 56)) ^ f); }

const char *content_name(enum content c) {
	switch (c) {
	case C_TEXT: return "text";
	case C_REPEAT: return "repeat";
	case C_RANDOM: return "random";
	case C_ZERO: return "zero";
	default: return "mixed";
	}
}

enum content fill_class(u64 f) {
	if (cfg.content != C_MIXED) return cfg.content;
	u64 r = page_key(f, 1) % 10;
	return r < 4 ? C_TEXT : r < 6 ? C_REPEAT : r < 8 ? C_RANDOM : C_ZERO;
}

/* word_pick: skewed towards the front of the list, roughly like word
 * frequencies in English (the product of two uniform bytes). */
static const char *word_pick(u64 r) { return words[((r & 0xff) * ((r >> 8) & 0xff) >> 8) * NWORDS >> 8]; }

static inline u64 load64(const void *p) {
	u64 v;
	__builtin_memcpy(&v, p, 8);
	return v;
}
static inline void store64(void *p, u64 v) { __builtin_memcpy(p, &v, 8); }

/* Bytes before the first zero byte of the 16 at w (a word's length). */
static inline u64 word_len(u64 lo, u64 hi) {
	u64 z = (lo - 0x0101010101010101UL) & ~lo & 0x8080808080808080UL;
	if (z) return (u64)__builtin_ctzl(z) / 8;
	z = (hi - 0x0101010101010101UL) & ~hi & 0x8080808080808080UL;
	return 8 + (u64)__builtin_ctzl(z) / 8;
}

/* Text repeats phrases, not only words, as language does: phrase j (of
 * PHRASES, the same for every seed) is 1 to 4 fixed words. PHRASES sets
 * the compression ratio: 4096 gives about 3.5x with zstd -3. */
#define PHRASES 4096

static void text_page(u64 *w, u64 key) {
	u8 buf[4096 + 64]; /* a sentence may run past the page: cut below */
	u64 s = key | 1, n = 0, col = 0, left = 0;
	int cap = 1;
	while (n < 4096) {
		u64 r = xorshift(&s);
		u64 j = ((r & 0xffff) * ((r >> 16) & 0xffff) >> 16) * PHRASES >> 16;
		u64 h = mix(j ^ 0x7068726173650000UL);
		if (!left) left = 2 + (r >> 32) % 6; /* phrases in this sentence */
		for (u64 k = 0, nw = 1 + h % 4; k < nw && n < 4096; k++) {
			const char *wd = word_pick(mix(h + k));
			u64 lo = load64(wd), hi = load64(wd + 8), len = word_len(lo, hi);
			if (col && col + 1 + len + 1 > LINE_COLS) {
				buf[n++] = '\n';
				col = 0;
			} else if (col) {
				buf[n++] = ' ';
				col++;
			}
			if (cap) lo -= 'a' - 'A'; /* capitalise the first letter */
			cap = 0;
			store64(buf + n, lo);
			store64(buf + n + 8, hi);
			n += len;
			col += len;
		}
		if (--left == 0) {
			buf[n++] = '.';
			col++;
			cap = 1;
			if ((r >> 40) % 8 == 0) { /* end of paragraph: a blank line */
				buf[n++] = '\n';
				buf[n++] = '\n';
				col = 0;
			}
		} else if ((r >> 40) % 6 == 0) {
			buf[n++] = ',';
			col++;
		}
	}
	for (u64 i = 0; i < 512; i++) w[i] = load64(buf + i * 8);
}

static void random_page(u64 *w, u64 key) {
	for (u64 i = 0; i < 512; i++) w[i] = mix(key + i);
}

void fill_content(u64 *w, u64 f) {
	switch (fill_class(f)) {
	case C_TEXT: text_page(w, page_key(f, 2)); break;
	case C_REPEAT: random_page(w, page_key(page_key(f, 3) % REPEAT_IMAGES, 4)); break;
	case C_RANDOM: random_page(w, page_key(f, 5)); break;
	default:
		for (u64 i = 0; i < 512; i++) w[i] = 0;
	}
}
