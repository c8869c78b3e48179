package xbzrle

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

func randPage(rng *rand.Rand) []byte {
	p := make([]byte, PageSize)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// roundTrip encodes new against old, checks the delta's length, applies it
// to a copy of old and checks the result.
func roundTrip(t *testing.T, old, new []byte) ([]byte, bool) {
	t.Helper()
	prefix := []byte("prefix")
	d, ok := Encode(bytes.Clone(prefix), old, new)
	if !bytes.HasPrefix(d, prefix) {
		t.Fatal("Encode did not append to dst")
	}
	d = d[len(prefix):]
	if !ok {
		if len(d) != 0 {
			t.Fatalf("Encode failed but appended %d bytes", len(d))
		}
		return nil, false
	}
	if len(d) > Limit(len(new)) {
		t.Fatalf("delta of %d bytes exceeds the limit %d", len(d), Limit(len(new)))
	}
	if err := Check(d, len(old)); err != nil {
		t.Fatalf("Check refuses Encode's delta: %v", err)
	}
	page := bytes.Clone(old)
	if err := Decode(page, d); err != nil {
		t.Fatalf("Decode refuses Encode's delta: %v", err)
	}
	if !bytes.Equal(page, new) {
		t.Fatal("round trip changed the page")
	}
	return d, true
}

func TestIdentity(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, p := range [][]byte{make([]byte, PageSize), randPage(rng), nil, {1}} {
		d, ok := roundTrip(t, p, bytes.Clone(p))
		if !ok || len(d) != 0 {
			t.Fatalf("identical pages: %v, delta %x", ok, d)
		}
	}
}

func TestSmallChanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	old := randPage(rng)
	for _, c := range []struct {
		name    string
		changes []int // offsets to change
		want    []byte
	}{
		{"first byte", []int{0}, []byte{0, 1, 'x'}},
		{"last byte", []int{4095}, []byte{0xff, 0x1f, 1, 'x'}},
		{"two apart", []int{10, 20}, []byte{10, 1, 'x', 9, 1, 'x'}},
		// Gaps of one and two unchanged bytes are folded into the run,
		// which carries their (old) content.
		{"gap of 1", []int{5, 7}, []byte{5, 3, 'x', old[6], 'x'}},
		{"gap of 2", []int{5, 8}, []byte{5, 4, 'x', old[6], old[7], 'x'}},
		{"gap of 3", []int{5, 9}, []byte{5, 1, 'x', 3, 1, 'x'}},
		{"run", []int{100, 101, 102, 103, 104, 105, 106, 107, 108, 109}, append([]byte{100, 10}, "xxxxxxxxxx"...)},
	} {
		new := bytes.Clone(old)
		for _, o := range c.changes {
			new[o] = 'x'
			if old[o] == 'x' {
				t.Fatalf("%s: test page already has x at %d", c.name, o)
			}
		}
		d, ok := roundTrip(t, old, new)
		if !ok || !bytes.Equal(d, c.want) {
			t.Errorf("%s: %v, delta %x, want %x", c.name, ok, d, c.want)
		}
	}
}

func TestLimit(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	old := randPage(rng)
	// Every byte changed: the delta would be the whole page and more.
	new := bytes.Clone(old)
	for i := range new {
		new[i] ^= 0xff
	}
	if _, ok := roundTrip(t, old, new); ok {
		t.Error("a completely changed page encoded")
	}
	// Every third byte changed: the gaps are folded, so the delta is the
	// whole page.
	new = bytes.Clone(old)
	for i := 0; i < len(new); i += 3 {
		new[i] ^= 1
	}
	if _, ok := roundTrip(t, old, new); ok {
		t.Error("every third byte changed: encoded")
	}
	// Every fourth byte: pairs of 3 bytes for 4 page bytes, exactly the
	// limit.
	new = bytes.Clone(old)
	for i := 0; i < len(new); i += 4 {
		new[i] ^= 1
	}
	if d, ok := roundTrip(t, old, new); !ok || len(d) != MaxDelta {
		t.Errorf("every fourth byte changed: %v, %d bytes", ok, len(d))
	}
	// Just below and just above the limit: one changed run.
	for _, n := range []int{MaxDelta - 4, MaxDelta - 3, MaxDelta - 2} {
		new = bytes.Clone(old)
		for i := 1000; i < 1000+n; i++ {
			new[i] ^= 0x80
		}
		d, ok := roundTrip(t, old, new)
		// skip 1000 (2 bytes) + count (2 bytes) + n bytes.
		if want := 4+n <= MaxDelta; ok != want {
			t.Errorf("run of %d: ok %v, delta %d bytes", n, ok, len(d))
		}
	}
	if MaxDelta != Limit(PageSize) || MaxDelta != 3072 {
		t.Errorf("MaxDelta %d, Limit %d", MaxDelta, Limit(PageSize))
	}
}

func TestRandomRoundTrips(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	var encoded, refused int
	for i := range 3000 {
		size := PageSize
		if i%10 == 0 {
			size = rng.IntN(100)
		}
		old := randPage(rng)[:size]
		new := bytes.Clone(old)
		// A few runs of changes of random lengths, some bytes "changed" to
		// their old value.
		for range rng.IntN(1 + i%40) {
			if size == 0 {
				break
			}
			at := rng.IntN(size)
			n := min(size-at, 1+rng.IntN(1+rng.IntN(300)))
			for j := at; j < at+n; j++ {
				if rng.IntN(8) != 0 {
					new[j] = byte(rng.Uint32())
				}
			}
		}
		if _, ok := roundTrip(t, old, new); ok {
			encoded++
		} else {
			refused++
		}
	}
	if encoded < 1000 || refused < 100 {
		t.Errorf("%d encoded, %d refused: the test does not cover both", encoded, refused)
	}
}

func TestDecodeErrors(t *testing.T) {
	page := bytes.Repeat([]byte{7}, PageSize)
	uv := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.AppendUvarint(b, v)
		}
		return b
	}
	for _, c := range []struct {
		name  string
		delta []byte
		want  string
	}{
		{"truncated skip", []byte{0x80}, "delta byte 0: unchanged-byte count truncated"},
		{"no count", uv(5), "delta byte 1: changed-byte count truncated"},
		{"truncated count", append(uv(5), 0x80), "delta byte 1: changed-byte count truncated"},
		{"short data", append(uv(5, 3), 1, 2), "delta byte 2: 3 changed bytes announced, 2 left in the delta"},
		{"empty run", uv(5, 0), "delta byte 1: pair 0 has no changed bytes"},
		{"zero skip", append(append(uv(5, 1), 1), uv(0, 1, 1)...), "delta byte 3: pair 1 has no unchanged bytes"},
		{"skip past end", uv(PageSize+1, 1, 1), "delta byte 0: 4097 unchanged bytes at page offset 0 go past the end of the 4096-byte page"},
		{"skip to end", uv(PageSize, 1, 1), "delta byte 2: 1 changed bytes at page offset 4096 go past the end of the 4096-byte page"},
		{"skip far past end", uv(1<<40, 1, 1), "go past the end of the 4096-byte page"},
		{"run past end", append(uv(4000, 97), make([]byte, 97)...), "delta byte 2: 97 changed bytes at page offset 4000 go past the end of the 4096-byte page"},
		{"huge run", uv(0, 1<<62), "changed bytes at page offset 0 go past the end"},
		{"overflow", bytes.Repeat([]byte{0xff}, 11), "delta byte 0: unchanged-byte count overflows 64 bits"},
		{"not minimal", []byte{0x85, 0x00, 1, 1}, "delta byte 0: unchanged-byte count is not a minimal varint"},
		{"second run past end", append(append(uv(0, 4000), make([]byte, 4000)...), uv(10, 90)...), "90 changed bytes at page offset 4010 go past the end"},
	} {
		p := bytes.Clone(page)
		err := Decode(p, c.delta)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "xbzrle: ") {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
		if !bytes.Equal(p, page) {
			t.Errorf("%s: the refused delta changed the page", c.name)
		}
	}
	// The last run may end exactly at the end of the page.
	p := bytes.Clone(page)
	if err := Decode(p, append(uv(4000, 96), bytes.Repeat([]byte{1}, 96)...)); err != nil || p[4095] != 1 || p[3999] != 7 {
		t.Errorf("run to the end: %v", err)
	}
}

func TestEncodeLengthMismatch(t *testing.T) {
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "xbzrle: Encode of a 3-byte page against a 4-byte one") {
			t.Errorf("recovered %v", r)
		}
	}()
	Encode(nil, make([]byte, 4), make([]byte, 3))
}

// nextDiff and nextSame agree with a byte-by-byte scan at every offset.
func TestScans(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for range 200 {
		n := rng.IntN(70)
		a, b := make([]byte, n), make([]byte, n)
		for i := range a {
			a[i] = byte(rng.IntN(3))
			b[i] = byte(rng.IntN(3))
		}
		for i := 0; i <= n; i++ {
			d, s := i, i
			for d < n && a[d] == b[d] {
				d++
			}
			for s < n && a[s] != b[s] {
				s++
			}
			if got := nextDiff(a, b, i); got != d {
				t.Fatalf("nextDiff(%x, %x, %d) = %d, want %d", a, b, i, got, d)
			}
			if got := nextSame(a, b, i); got != s {
				t.Fatalf("nextSame(%x, %x, %d) = %d, want %d", a, b, i, got, s)
			}
		}
	}
}

// FuzzDecode applies arbitrary deltas to a page: Decode must never panic
// or write outside the page, must leave the page untouched when it refuses
// the delta, and must agree with Check.
func FuzzDecode(f *testing.F) {
	rng := rand.New(rand.NewPCG(11, 12))
	old := randPage(rng)
	for _, n := range []int{1, 5, 50, 400} {
		new := bytes.Clone(old)
		for range n {
			new[rng.IntN(PageSize)] ^= 0x55
		}
		d, ok := Encode(nil, old, new)
		if !ok {
			f.Fatal("seed did not encode")
		}
		f.Add(d, uint16(PageSize))
	}
	f.Add([]byte{}, uint16(0))
	f.Add([]byte{0xff, 0x1f, 1, 0}, uint16(PageSize))
	f.Fuzz(func(t *testing.T, delta []byte, size uint16) {
		size %= 2 * PageSize
		// The page sits inside a larger buffer whose guard bytes must
		// survive.
		buf := make([]byte, int(size)+64)
		for i := range buf {
			buf[i] = 0xa5
		}
		page := buf[32 : 32+int(size) : 32+int(size)]
		err := Decode(page, delta)
		if cerr := Check(delta, int(size)); (cerr == nil) != (err == nil) {
			t.Fatalf("Decode: %v, Check: %v", err, cerr)
		}
		for i := range 32 {
			if buf[i] != 0xa5 || buf[len(buf)-1-i] != 0xa5 {
				t.Fatal("Decode wrote outside the page")
			}
		}
		if err != nil {
			if !bytes.Equal(buf, bytes.Repeat([]byte{0xa5}, len(buf))) {
				t.Fatal("a refused delta changed the page")
			}
			return
		}
		// What Decode accepts, Encode reproduces the result of (not
		// necessarily with the same delta).
		orig := bytes.Repeat([]byte{0xa5}, int(size))
		if d, ok := Encode(nil, orig, page); ok {
			again := bytes.Clone(orig)
			if err := Decode(again, d); err != nil || !bytes.Equal(again, page) {
				t.Fatalf("re-encoded delta: %v", err)
			}
		}
	})
}

// FuzzRoundTrip encodes one page against another: whatever Encode returns
// must be within the limit and decode back to the new page.
func FuzzRoundTrip(f *testing.F) {
	rng := rand.New(rand.NewPCG(13, 14))
	old := randPage(rng)
	new := bytes.Clone(old)
	new[10], new[4000] = 1, 2
	f.Add(old, new)
	f.Add(make([]byte, 64), bytes.Repeat([]byte{1, 0, 0}, 22)[:64])
	f.Add([]byte("hello, world"), []byte("hello, there"))
	f.Fuzz(func(t *testing.T, old, new []byte) {
		n := min(len(old), len(new))
		roundTrip(t, old[:n], new[:n])
	})
}

// testPair returns a page and a version of it with changes of the given
// density: runs of random bytes covering about frac of the page.
func testPair(rng *rand.Rand, frac float64) (old, new []byte) {
	old = randPage(rng)
	new = bytes.Clone(old)
	for covered := 0; float64(covered) < frac*PageSize; {
		at, n := rng.IntN(PageSize), 1+rng.IntN(64)
		n = min(n, PageSize-at)
		for j := at; j < at+n; j++ {
			new[j] = byte(rng.Uint32())
		}
		covered += n
	}
	return old, new
}

func BenchmarkEncode(b *testing.B) {
	for _, c := range []struct {
		name string
		frac float64
	}{{"unchanged", 0}, {"1pct", 0.01}, {"10pct", 0.10}, {"40pct", 0.40}, {"full", 2}} {
		b.Run(c.name, func(b *testing.B) {
			rng := rand.New(rand.NewPCG(15, 16))
			old, new := testPair(rng, c.frac)
			if c.frac > 1 {
				for i := range new {
					new[i] = old[i] ^ 0xff
				}
			}
			dst := make([]byte, 0, PageSize)
			d, ok := Encode(dst, old, new)
			b.SetBytes(PageSize)
			b.ReportAllocs()
			for b.Loop() {
				Encode(dst, old, new)
			}
			b.ReportMetric(float64(len(d)), "delta-bytes")
			if !ok {
				b.ReportMetric(1, "refused")
			}
		})
	}
}

func BenchmarkDecode(b *testing.B) {
	for _, c := range []struct {
		name string
		frac float64
	}{{"unchanged", 0}, {"1pct", 0.01}, {"10pct", 0.10}, {"40pct", 0.40}} {
		b.Run(c.name, func(b *testing.B) {
			rng := rand.New(rand.NewPCG(15, 16))
			old, new := testPair(rng, c.frac)
			d, ok := Encode(nil, old, new)
			if !ok {
				b.Skip("refused")
			}
			page := bytes.Clone(old)
			b.SetBytes(PageSize)
			b.ReportAllocs()
			for b.Loop() {
				if err := Decode(page, d); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(d)), "delta-bytes")
		})
	}
}

// The example of docs/state-format.md, "Delta encoding": keep them equal.
func TestDocExample(t *testing.T) {
	old, new := make([]byte, PageSize), make([]byte, PageSize)
	new[300], new[301], new[4095] = 0x41, 0x42, 0x43
	d, ok := Encode(nil, old, new)
	want := []byte{0xac, 0x02, 0x02, 0x41, 0x42, 0xd1, 0x1d, 0x01, 0x43}
	if !ok || !bytes.Equal(d, want) {
		t.Fatalf("delta % x, want % x", d, want)
	}
}
