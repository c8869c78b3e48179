// Package xbzrle owns the delta encoding of a memory page against an
// earlier version of the same page, as the migration stream's delta page
// records carry it (docs/state-format.md, "Delta encoding"). It is
// XBZRLE-style (XOR-based zero-run-length encoding, after QEMU's migration
// feature of that name): the bytes where the XOR of the two versions is zero
// are skipped, the others are sent as the new bytes.
//
// A delta is a sequence of pairs, each
//
//	skip  uvarint   unchanged bytes to leave as they are
//	n     uvarint   changed bytes that follow
//	data  n bytes   the new content of those bytes
//
// applied from the start of the page. Unchanged bytes after the last pair
// are not encoded (an empty delta leaves the page as it is). Every pair
// but the first has skip ≥ 1, every pair has n ≥ 1, varints are minimal
// (the encoding/binary uvarint, at most 2 bytes for a 4096-byte page) and
// no pair reaches past the end of the page; Decode refuses anything else.
//
// The package knows nothing of the stream around a delta: internal/state
// frames deltas as page records and decides when to send one.
package xbzrle

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
)

// PageSize is the size of the pages the migration stream carries. Encode
// and Decode work on any length; the limits below are for a page.
const PageSize = 4096

// MaxDelta is the longest delta Encode produces for a PageSize page: 3/4
// of the page. A page whose delta would be longer is better sent whole.
const MaxDelta = 3 * PageSize / 4

// mergeGap is the longest run of unchanged bytes that Encode folds into the
// surrounding changed bytes: a new pair costs at least 2 bytes of varints,
// so a gap of 1 or 2 bytes is as cheap or cheaper to resend (and a pair
// fewer makes decoding faster).
const mergeGap = 2

// Limit returns the longest delta Encode produces for pages of size
// bytes: 3/4 of the page, rounded down.
func Limit(size int) int { return size / 4 * 3 }

// Encode appends to dst the delta that turns old into new and returns it
// with true. When that delta would be longer than Limit(len(new)) (MaxDelta
// for a page) it stops early and returns dst unchanged and false: send the
// page whole. Identical pages give an empty delta. old and new must have
// the same length; Encode panics otherwise.
func Encode(dst, old, new []byte) ([]byte, bool) {
	if len(old) != len(new) {
		panic(fmt.Sprintf("xbzrle: Encode of a %d-byte page against a %d-byte one", len(new), len(old)))
	}
	start, size := len(dst), len(new)
	limit := start + Limit(size)
	pos := 0 // end of the last pair written
	for i := 0; ; {
		j := nextDiff(old, new, i)
		if j == size {
			return dst, true
		}
		// The changed run [j, k), with gaps of at most mergeGap unchanged
		// bytes folded in (never a trailing one: it is not encoded).
		k := nextSame(old, new, j)
		for k < size {
			d := nextDiff(old, new, k)
			if d == size || d-k > mergeGap {
				break
			}
			k = nextSame(old, new, d)
		}
		skip, n := j-pos, k-j
		if len(dst)+uvarintLen(skip)+uvarintLen(n)+n > limit {
			return dst[:start], false
		}
		dst = binary.AppendUvarint(dst, uint64(skip))
		dst = binary.AppendUvarint(dst, uint64(n))
		dst = append(dst, new[j:k]...)
		pos, i = k, k
	}
}

// Decode applies delta to page, which holds the version the delta was
// encoded against, turning it into the new version. A malformed delta, or
// one that reaches past the end of page, is refused with an error naming
// the offending byte of the delta, and page is left untouched: the whole
// delta is checked before anything is written.
func Decode(page, delta []byte) error {
	if err := Check(delta, len(page)); err != nil {
		return err
	}
	pos := 0
	for i := 0; i < len(delta); {
		skip, m := binary.Uvarint(delta[i:])
		i += m
		n, m := binary.Uvarint(delta[i:])
		i += m
		pos += int(skip)
		pos += copy(page[pos:pos+int(n)], delta[i:i+int(n)])
		i += int(n)
	}
	return nil
}

// Check reports whether delta is well-formed for a page of size bytes (as
// Decode would apply it), without applying it.
func Check(delta []byte, size int) error {
	pos := 0
	for i, pair := 0, 0; i < len(delta); pair++ {
		skip, m, err := readUvarint(delta, i, "unchanged-byte count")
		if err != nil {
			return err
		}
		if skip == 0 && pair > 0 {
			return fmt.Errorf("xbzrle: delta byte %d: pair %d has no unchanged bytes (only the first pair may start right after the previous one)", i, pair)
		}
		if skip > uint64(size-pos) {
			return fmt.Errorf("xbzrle: delta byte %d: %d unchanged bytes at page offset %d go past the end of the %d-byte page", i, skip, pos, size)
		}
		pos += int(skip)
		i += m
		n, m, err := readUvarint(delta, i, "changed-byte count")
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("xbzrle: delta byte %d: pair %d has no changed bytes", i, pair)
		}
		if n > uint64(size-pos) {
			return fmt.Errorf("xbzrle: delta byte %d: %d changed bytes at page offset %d go past the end of the %d-byte page", i, n, pos, size)
		}
		i += m
		if n > uint64(len(delta)-i) {
			return fmt.Errorf("xbzrle: delta byte %d: %d changed bytes announced, %d left in the delta", i, n, len(delta)-i)
		}
		pos += int(n)
		i += int(n)
	}
	return nil
}

// readUvarint reads the minimal uvarint at delta[i:].
func readUvarint(delta []byte, i int, what string) (uint64, int, error) {
	v, m := binary.Uvarint(delta[i:])
	switch {
	case m == 0:
		return 0, 0, fmt.Errorf("xbzrle: delta byte %d: %s truncated", i, what)
	case m < 0:
		return 0, 0, fmt.Errorf("xbzrle: delta byte %d: %s overflows 64 bits", i, what)
	case m > 1 && delta[i+m-1] == 0:
		return 0, 0, fmt.Errorf("xbzrle: delta byte %d: %s is not a minimal varint", i, what)
	}
	return v, m, nil
}

// diffBlock is the size of the blocks nextDiff compares whole.
const diffBlock = 256

func uvarintLen(v int) int {
	n := 1
	for ; v >= 0x80; v >>= 7 {
		n++
	}
	return n
}

// nextDiff returns the first index ≥ i at which a and b differ, or
// len(a). It skips equal blocks with the runtime's vectorized comparison,
// then compares 8 bytes at a time.
func nextDiff(a, b []byte, i int) int {
	n := len(a)
	b = b[:n]
	for ; i+diffBlock <= n && bytes.Equal(a[i:i+diffBlock], b[i:i+diffBlock]); i += diffBlock {
	}
	for ; i+8 <= n; i += 8 {
		if x := binary.LittleEndian.Uint64(a[i:]) ^ binary.LittleEndian.Uint64(b[i:]); x != 0 {
			return i + bits.TrailingZeros64(x)/8
		}
	}
	for ; i < n && a[i] == b[i]; i++ {
	}
	return i
}

// nextSame returns the first index ≥ i at which a and b are equal, or
// len(a). It looks for a zero byte in the XOR of 8 bytes at a time (the
// lowest byte flagged by the usual has-zero-byte trick is exact).
func nextSame(a, b []byte, i int) int {
	const lo, hi = 0x0101010101010101, 0x8080808080808080
	n := len(a)
	b = b[:n]
	for ; i+8 <= n; i += 8 {
		x := binary.LittleEndian.Uint64(a[i:]) ^ binary.LittleEndian.Uint64(b[i:])
		if z := (x - lo) &^ x & hi; z != 0 {
			return i + bits.TrailingZeros64(z)/8
		}
	}
	for ; i < n && a[i] != b[i]; i++ {
	}
	return i
}
