package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/pierrec/lz4/v4"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/xbzrle"
)

func TestParseCodec(t *testing.T) {
	for _, c := range []struct {
		in     string
		codec  Codec
		level  int
		format string
	}{
		{"none", CodecNone, 0, "none"},
		{" NONE ", CodecNone, 0, "none"},
		{"zstd", CodecZstd, 1, "zstd:1"},
		{"zstd:3", CodecZstd, 3, "zstd:3"},
		{"zstd:22", CodecZstd, 22, "zstd:22"},
		{"zstd:fastest", CodecZstd, ZstdFastest, "zstd:1"},
		{"zstd:default", CodecZstd, ZstdDefault, "zstd:3"},
		{"Zstd:Better", CodecZstd, ZstdBetter, "zstd:7"},
		{"zstd:best", CodecZstd, ZstdBest, "zstd:11"},
		{"lz4", CodecLZ4, LZ4Fast, "lz4"},
		{"lz4:fast", CodecLZ4, LZ4Fast, "lz4"},
		{"lz4:hc", CodecLZ4, LZ4HC, "lz4:1"},
		{"lz4:1", CodecLZ4, 1, "lz4:1"},
		{"lz4:9", CodecLZ4, 9, "lz4:9"},
	} {
		codec, level, err := ParseCodec(c.in)
		if err != nil || codec != c.codec || level != c.level {
			t.Errorf("ParseCodec(%q) = %v, %d, %v; want %v, %d", c.in, codec, level, err, c.codec, c.level)
			continue
		}
		if got := FormatCodec(codec, level); got != c.format {
			t.Errorf("FormatCodec(%v, %d) = %q, want %q", codec, level, got, c.format)
		}
		if e, err := NewChunkEncoder(codec, level); err != nil {
			t.Errorf("%q: NewChunkEncoder: %v", c.in, err)
		} else {
			e.Close()
		}
	}
	for _, in := range []string{"", "zip", "none:1", "zstd:0", "zstd:23", "zstd:x", "zstd:", "lz4:0", "lz4:10", "lz4:hc9", "lz4:-1"} {
		if c, l, err := ParseCodec(in); err == nil || !strings.HasPrefix(err.Error(), fmt.Sprintf("state: codec %q: want none, zstd", in)) {
			t.Errorf("ParseCodec(%q) = %v, %d, %v", in, c, l, err)
		}
	}
	for _, c := range []struct {
		codec Codec
		level int
		want  string
	}{
		{CodecNone, 1, "state: no compression has no level 1"},
		{CodecZstd, 23, "state: zstd level 23 out of range 1-22"},
		{CodecZstd, -1, "state: zstd level -1 out of range 1-22"},
		{CodecLZ4, 10, "state: lz4 level 10 out of range 0-9"},
		{Codec(7), 0, "state: unknown codec 7"},
	} {
		if _, err := NewChunkEncoder(c.codec, c.level); err == nil || err.Error() != c.want {
			t.Errorf("NewChunkEncoder(%v, %d): %v, want %q", c.codec, c.level, err, c.want)
		}
	}
	if FormatCodec(CodecZstd, 0) != "zstd:1" || Codec(7).String() != "codec 7" {
		t.Error("FormatCodec")
	}
}

// testCodecs are the codecs the round-trip tests cover.
var testCodecs = []string{"none", "zstd", "zstd:3", "zstd:7", "zstd:11", "lz4", "lz4:1", "lz4:hc"}

// pageAt returns the page at gpa in a memory image laid out by testLayout.
func pageAt(t testing.TB, mem []byte, gpa uint64) []byte {
	t.Helper()
	off, ok := layoutOffset(testLayout(), gpa)
	if !ok {
		t.Fatalf("gpa %#x outside the test layout", gpa)
	}
	return mem[off : off+PageSize : off+PageSize]
}

// randPFN returns a page frame in testLayout.
func randPFN(rng *rand.Rand) uint64 {
	if rng.IntN(2) == 0 {
		return uint64(rng.IntN(256))
	}
	return 1<<20 + uint64(rng.IntN(256))
}

// textPage is a page of English-like text.
func textPage(rng *rand.Rand) []byte {
	words := strings.Fields("the guest kernel maps a page of memory and writes to it while the migration " +
		"copies dirty pages to the destination host over a network link of some bandwidth")
	var b []byte
	for len(b) < PageSize {
		b = append(b, words[rng.IntN(len(words))]...)
		b = append(b, ' ')
	}
	return b[:PageSize]
}

// touch returns a copy of page with a few small runs changed.
func touch(rng *rand.Rand, page []byte, runs int) []byte {
	p := bytes.Clone(page)
	for range runs {
		at := rng.IntN(PageSize - 16)
		for j := at; j < at+1+rng.IntN(16); j++ {
			p[j] = byte(rng.Uint32()) | 1
		}
	}
	return p
}

// mixedChunk adds n records of every encoding to e, in a random order,
// and applies them to want (the receiver's expected memory) as it goes.
func mixedChunk(t testing.TB, rng *rand.Rand, e *ChunkEncoder, want []byte, n int) {
	for i := range n {
		pfn := randPFN(rng)
		cur := pageAt(t, want, pfn*PageSize)
		var next []byte
		switch i % 6 {
		case 0: // a small change, encoded by Page as a delta
			next = touch(rng, cur, 1+rng.IntN(5))
			if enc := e.Page(pfn, cur, next); enc != PageDelta {
				t.Fatalf("record %d: Page chose encoding %d for a small change", i, enc)
			}
		case 1: // a text page, raw
			next = textPage(rng)
			e.Raw(pfn, next)
		case 2: // zeros
			next = make([]byte, PageSize)
			if i%4 == 0 {
				e.Raw(pfn, next)
			} else if enc := e.Page(pfn, cur, next); enc != PageZero {
				t.Fatalf("record %d: Page chose encoding %d for zeros", i, enc)
			}
		case 3: // a copy of another page as it is now
			from := randPFN(rng)
			next = bytes.Clone(pageAt(t, want, from*PageSize))
			e.Dup(pfn, from)
		case 4: // a delta encoded by the caller
			next = touch(rng, cur, 1+rng.IntN(20))
			d, ok := xbzrle.Encode(nil, cur, next)
			if !ok {
				t.Fatal("small change did not encode")
			}
			e.Delta(pfn, d)
		case 5: // random, through Page: too different for a delta
			next = randBytes(rng, PageSize)
			if enc := e.Page(pfn, cur, next); enc != PageRaw {
				t.Fatalf("record %d: Page chose encoding %d for a random page", i, enc)
			}
		}
		copy(cur, next)
	}
	if e.Len() != n {
		t.Fatalf("Len %d after %d records", e.Len(), n)
	}
}

// Mixed records round-trip through every codec into a memory image.
func TestChunkRoundTrip(t *testing.T) {
	regions := testLayout()
	for _, name := range testCodecs {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(101, uint64(len(name))))
			codec, level, err := ParseCodec(name)
			if err != nil {
				t.Fatal(err)
			}
			e, err := NewChunkEncoder(codec, level)
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			dec := NewChunkDecoder()
			defer dec.Close()
			recv, _ := testMemory(rng)
			want := bytes.Clone(recv)
			for round, n := range []int{1, 7, 60, ChunkPages, ChunkPages} {
				e.Reset()
				mixedChunk(t, rng, e, want, n)
				b, err := e.Finish()
				if err != nil {
					t.Fatal(err)
				}
				if again, err := e.Finish(); err != nil || &again[0] != &b[0] {
					t.Fatalf("second Finish: %v", err)
				}
				st := e.Stats()
				if st.Records != n || st.Zero+st.Raw+st.Delta+st.Dup != n || st.Stored != len(b) {
					t.Fatalf("stats %+v for %d records, %d bytes", st, n, len(b))
				}
				flags := le.Uint16(b[2:])
				wantFlag := map[Codec]uint16{CodecNone: 0, CodecZstd: SectionZstd, CodecLZ4: SectionLZ4}[codec]
				if st.Compressed != (flags != SectionRequired) || (flags != SectionRequired && flags != SectionRequired|wantFlag) {
					t.Fatalf("round %d: flags %#x, stats %+v", round, flags, st)
				}
				if n >= 60 && codec != CodecNone && !st.Compressed {
					t.Fatalf("round %d: %d compressible records not compressed", round, n)
				}
				got, err := ApplyPageChunk(b, regions, recv, dec)
				if err != nil || got != n {
					t.Fatalf("round %d: ApplyPageChunk: %d, %v", round, got, err)
				}
				if !bytes.Equal(recv, want) {
					t.Fatalf("round %d: memory differs after applying the chunk", round)
				}
				// The callback decoder refuses delta and dup records.
				if st.Delta+st.Dup > 0 {
					_, err := DecodePageChunk(b, randomMachine(rng, 1, 0).Header, nil)
					var fe *FormatError
					if !errors.As(err, &fe) || !strings.Contains(err.Error(), "delta and dup records need the receiver's memory") {
						t.Fatalf("DecodePageChunk of delta and dup records: %v", err)
					}
				}
			}
			// Without a decoder.
			e.Reset()
			mixedChunk(t, rng, e, want, 30)
			b, err := e.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ApplyPageChunk(b, regions, recv, nil); err != nil || !bytes.Equal(recv, want) {
				t.Fatalf("nil decoder: %v", err)
			}
			// Raw and zero records of every codec decode with DecodePageChunk.
			e.Reset()
			pfns, data := testPages(rng, 40)
			for i, pfn := range pfns {
				e.Raw(pfn, data[i])
			}
			b, err = e.Finish()
			if err != nil {
				t.Fatal(err)
			}
			i := 0
			if _, err := DecodePageChunk(b, randomMachine(rng, 1, 0).Header, func(gpa uint64, d []byte) error {
				if gpa != pfns[i]*PageSize || !bytes.Equal(d, data[i]) {
					return fmt.Errorf("page %d differs", i)
				}
				i++
				return nil
			}); err != nil || i != len(pfns) {
				t.Fatalf("DecodePageChunk: %v after %d pages", err, i)
			}
		})
	}
}

// Dup and delta records apply to the receiver's current content: after
// the records before them in the same chunk.
func TestApplyOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(102, 103))
	regions := testLayout()
	mem, _ := testMemory(rng)
	a, b := uint64(3), uint64(1<<20+5)
	pa := pageAt(t, mem, a*PageSize)
	e, err := NewChunkEncoder(CodecLZ4, 0)
	if err != nil {
		t.Fatal(err)
	}
	text := textPage(rng)
	e.Raw(a, text) // a := text
	e.Dup(b, a)    // b := a (text)
	newer := touch(rng, text, 3)
	d, _ := xbzrle.Encode(nil, text, newer)
	e.Delta(a, d)   // a := text patched
	e.Dup(a, a)     // a copy onto itself changes nothing
	e.Delta(b, nil) // an empty delta changes nothing
	e.Zero(1)       // page 1 := zeros
	e.Dup(2, 1)     // page 2 := zeros
	chunk, err := e.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ApplyPageChunk(chunk, regions, mem, nil); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pa, newer) || !bytes.Equal(pageAt(t, mem, b*PageSize), text) ||
		!isZeroPage(pageAt(t, mem, PageSize)) || !isZeroPage(pageAt(t, mem, 2*PageSize)) {
		t.Fatal("records not applied in order")
	}
}

// chunkRecord builds a page record by hand.
func chunkRecord(pfn uint64, enc uint8, extra ...[]byte) []byte {
	b := le.AppendUint64(nil, pfn)
	b = append(b, enc)
	for _, x := range extra {
		b = append(b, x...)
	}
	return b
}

// handChunk seals records (with their count) into a memory chunk section.
func handChunk(t testing.TB, flags uint16, records ...[]byte) []byte {
	t.Helper()
	content := le.AppendUint32(nil, uint32(len(records)))
	for _, r := range records {
		content = append(content, r...)
	}
	return sealChunk(t, flags, content)
}

// sealChunk seals a payload into a memory chunk section.
func sealChunk(t testing.TB, flags uint16, payload []byte) []byte {
	t.Helper()
	s, _, err := sealSection(SectionMemory, flags, append(newSection(len(payload)), payload...))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// lz4Payload compresses content into an lz4 chunk payload declaring size.
func lz4Payload(t testing.TB, content []byte, size uint32) []byte {
	t.Helper()
	block := make([]byte, lz4.CompressBlockBound(len(content)))
	var c lz4.Compressor
	n, err := c.CompressBlock(content, block)
	if err != nil || n == 0 {
		t.Fatalf("lz4: %d, %v", n, err)
	}
	return append(le.AppendUint32(nil, size), block[:n]...)
}

// Malformed chunks are refused, naming the problem, and leave memory as it
// was.
func TestApplyErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(104, 105))
	regions := testLayout()
	mem, _ := testMemory(rng)
	orig := bytes.Clone(mem)
	page := textPage(rng)
	u16 := func(v uint16) []byte { return le.AppendUint16(nil, v) }
	u64 := func(v uint64) []byte { return le.AppendUint64(nil, v) }
	good := chunkRecord(1, PageRaw, page)
	pastEnd := append(binary.AppendUvarint(binary.AppendUvarint(nil, 4000), 200), make([]byte, 200)...)
	content := func(records ...[]byte) []byte {
		c := le.AppendUint32(nil, uint32(len(records)))
		for _, r := range records {
			c = append(c, r...)
		}
		return c
	}
	// A chunk of every encoding, for the lz4 cases.
	valid := content(good, chunkRecord(2, PageZero), chunkRecord(3, PageDup, u64(1)), chunkRecord(4, PageDelta, u16(3), []byte{0, 1, 9}))

	for _, c := range []struct {
		name  string
		chunk []byte
		want  string
	}{
		{"outside", handChunk(t, SectionRequired, good, chunkRecord(0x200, PageRaw, page)), "section 0 (memory chunk): page record 1: guest-physical address 0x200000 is outside the memory layout"},
		{"pfn overflow", handChunk(t, SectionRequired, chunkRecord(1<<60, PageZero)), "page record 0: page frame number 0x1000000000000000 out of range"},
		{"dup source outside", handChunk(t, SectionRequired, good, chunkRecord(1, PageDup, u64(0x300))), "page record 1 (gpa 0x1000): dup source guest-physical address 0x300000 is outside the memory layout"},
		{"dup source overflow", handChunk(t, SectionRequired, chunkRecord(1, PageDup, u64(1<<60))), "page record 0 (gpa 0x1000): dup source page frame number 0x1000000000000000 out of range"},
		{"dup truncated", handChunk(t, SectionRequired, good, chunkRecord(1, PageDup, []byte{1, 2, 3, 4})), "page record 1 (gpa 0x1000): dup record: 4 bytes left, the source page frame number needs 8"},
		{"dup outside", handChunk(t, SectionRequired, chunkRecord(0x100100, PageDup, u64(1))), "page record 0: guest-physical address 0x100100000 is outside the memory layout"},
		{"delta no length", handChunk(t, SectionRequired, good, chunkRecord(5, PageDelta, []byte{1})), "page record 1 (gpa 0x5000): delta record: 1 bytes left, the delta length needs 2"},
		{"delta truncated", handChunk(t, SectionRequired, good, chunkRecord(5, PageDelta, u16(10), []byte{0, 3, 1, 2, 3})), "page record 1 (gpa 0x5000): 5 bytes of delta, 10 expected"},
		{"delta too long", handChunk(t, SectionRequired, chunkRecord(5, PageDelta, u16(MaxDeltaLength+1), make([]byte, MaxDeltaLength+1))), "page record 0 (gpa 0x5000): delta of 4095 bytes, at most 4094 allowed"},
		{"delta past end", handChunk(t, SectionRequired, good, chunkRecord(5, PageDelta, u16(uint16(len(pastEnd))), pastEnd)), "page record 1 (gpa 0x5000): bad delta: delta byte 2: 200 changed bytes at page offset 4000 go past the end of the 4096-byte page"},
		{"delta empty run", handChunk(t, SectionRequired, chunkRecord(5, PageDelta, u16(2), []byte{3, 0})), "page record 0 (gpa 0x5000): bad delta: delta byte 1: pair 0 has no changed bytes"},
		{"unknown encoding", handChunk(t, SectionRequired, good, chunkRecord(5, 4)), "page record 1 (gpa 0x5000): unknown encoding 4"},
		{"trailing", sealChunk(t, SectionRequired, append(content(good), 0)), "1 unexpected bytes after 1 page records"},
		{"no records", handChunk(t, SectionRequired), "0 page records, 1 to 256 allowed"},
		{"checksum", func() []byte { b := handChunk(t, SectionRequired, good); b[30] ^= 1; return b }(), "section 0 (memory chunk): checksum mismatch"},
		{"both codecs", sealChunk(t, SectionRequired|SectionZstd|SectionLZ4, valid), "both the zstd and the lz4 flag are set"},
		{"unknown flag", sealChunk(t, SectionRequired|1<<3, valid), "unknown section flags 0x0008"},
		{"lz4 size too large", sealChunk(t, SectionRequired|SectionLZ4, lz4Payload(t, valid, uint32(len(valid)+1))), fmt.Sprintf("lz4: block decompresses to %d bytes, the content length says %d", len(valid), len(valid)+1)},
		{"lz4 size too small", sealChunk(t, SectionRequired|SectionLZ4, lz4Payload(t, valid, uint32(len(valid)-1))), fmt.Sprintf("lz4: corrupt block (content length %d)", len(valid)-1)},
		{"lz4 size beyond the limit", sealChunk(t, SectionRequired|SectionLZ4, lz4Payload(t, valid, MaxChunkLength+1)), "lz4: content length 1050885 exceeds the limit of 1050884"},
		{"lz4 size impossible", sealChunk(t, SectionRequired|SectionLZ4, append(le.AppendUint32(nil, 100000), make([]byte, 100)...)), "lz4: content length 100000 is impossible for a block of 100 bytes"},
		{"lz4 size zero", sealChunk(t, SectionRequired|SectionLZ4, []byte("\x00\x00\x00\x00\x01\x00\x90\x00\x00\x00\xc1\fz\x0fr>\xac\xb5k\xf0\x8b\xbf")), "lz4: content length 0"},
		{"lz4 no size", sealChunk(t, SectionRequired|SectionLZ4, []byte{1, 2}), "lz4: payload of 2 bytes has no content length"},
		{"lz4 garbage", sealChunk(t, SectionRequired|SectionLZ4, append(le.AppendUint32(nil, 1000), bytes.Repeat([]byte{0xff}, 100)...)), "lz4: corrupt block (content length 1000)"},
		{"zstd garbage", sealChunk(t, SectionRequired|SectionZstd, valid), "zstd: "},
		{"truncated", handChunk(t, SectionRequired, good)[:100], "state file: truncated in section 0 (memory chunk) at byte 100"},
		{"trailing section", append(handChunk(t, SectionRequired, good), 0), "section 0 (memory chunk): 1 unexpected bytes after the section"},
	} {
		dec := NewChunkDecoder()
		n, err := ApplyPageChunk(c.chunk, regions, mem, dec)
		dec.Close()
		var fe *FormatError
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.As(err, &fe) || n != 0 {
			t.Errorf("%s: got %d, %v; want %q", c.name, n, err, c.want)
		}
		if !bytes.Equal(mem, orig) {
			t.Fatalf("%s: the refused chunk changed memory", c.name)
		}
	}
	// The lz4 chunk is fine with the right size.
	if n, err := ApplyPageChunk(sealChunk(t, SectionRequired|SectionLZ4, lz4Payload(t, valid, uint32(len(valid)))), regions, mem, nil); err != nil || n != 4 {
		t.Fatalf("valid lz4 chunk: %d, %v", n, err)
	}
	if !bytes.Equal(pageAt(t, mem, 3*PageSize), page) || pageAt(t, mem, 4*PageSize)[0] != 9 || !isZeroPage(pageAt(t, mem, 2*PageSize)) {
		t.Fatal("valid lz4 chunk applied wrongly")
	}

	// Regions that do not fit the memory are the caller's error.
	chunk := handChunk(t, SectionRequired, good)
	for _, c := range []struct {
		name    string
		mem     []byte
		regions []guestmem.Region
		want    string
	}{
		{"short memory", mem[:1<<20], regions, "state: memory region 1 (offset 0x100000 size 0x100000) lies beyond the 0x100000 bytes of memory"},
		{"unaligned", mem, []guestmem.Region{{GPA: 0, Size: 100, Offset: 0}}, "is not page-aligned"},
	} {
		if _, err := ApplyPageChunk(chunk, c.regions, c.mem, nil); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}
}

// A stream (a save file) with delta or dup records is refused by the
// Reader, as is DecodePageChunk.
func TestReaderRefusesReferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(106, 107))
	m := randomMachine(rng, 1, 0)
	for _, rec := range [][]byte{
		chunkRecord(1, PageDelta, []byte{3, 0, 0, 1, 9}),
		chunkRecord(1, PageDup, le.AppendUint64(nil, 2)),
	} {
		var buf bytes.Buffer
		w, err := NewWriter(&buf, m.Header, WriterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteMachine(m); err != nil {
			t.Fatal(err)
		}
		content := append(le.AppendUint32(nil, 1), rec...)
		if err := w.writeSection(SectionMemory, SectionRequired, content); err != nil {
			t.Fatal(err)
		}
		w.Close()
		want := "state file: section 5 (memory chunk): page record 0 (gpa 0x1000): delta and dup records need the receiver's memory"
		if _, err := decode(buf.Bytes(), ReaderOptions{}); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("Reader: got %v, want %q", err, want)
		}
		want = strings.Replace(want, "section 5", "section 0", 1)
		if _, err := DecodePageChunk(handChunk(t, SectionRequired, rec), m.Header, nil); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("DecodePageChunk: got %v, want %q", err, want)
		}
	}
}

// A save file may be lz4-compressed: it reads back the same.
func TestWriterLZ4(t *testing.T) {
	rng := rand.New(rand.NewPCG(108, 109))
	m := randomMachine(rng, 2, 0)
	mem, nonZero := testMemory(rng)
	for _, level := range []int{0, 9} {
		data := encode(t, m, mem, WriterOptions{Compress: true, Codec: CodecLZ4, Level: level})
		got, err := decode(data, ReaderOptions{RequireEOF: true})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.image(), mem) || got.summary.NonZeroPages != uint64(nonZero) || got.m.Header.Flags&FlagMemoryCompressed == 0 {
			t.Fatal("lz4 save file does not read back")
		}
		_, spans := layoutOf(t, data)
		lz4Chunks := 0
		for _, s := range spans {
			if s.typ == SectionMemory && le.Uint16(data[s.start+2:])&SectionLZ4 != 0 {
				lz4Chunks++
			}
		}
		if lz4Chunks == 0 {
			t.Error("no lz4-compressed chunk")
		}
		// Smaller than uncompressed.
		if plain := encode(t, m, mem, WriterOptions{}); len(data) >= len(plain) {
			t.Errorf("lz4 level %d: %d bytes, uncompressed %d", level, len(data), len(plain))
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, m.Header, WriterOptions{Compress: true, Codec: CodecLZ4, Level: 10}); err == nil {
		t.Error("lz4 level 10 accepted")
	}
}

func TestChunkEncoderErrors(t *testing.T) {
	page := bytes.Repeat([]byte{1}, PageSize)
	for _, c := range []struct {
		name string
		add  func(e *ChunkEncoder)
		want string
	}{
		{"empty", func(e *ChunkEncoder) {}, "state: a memory chunk needs at least one page record"},
		{"short page", func(e *ChunkEncoder) { e.Raw(1, page[:10]) }, "state: page 0x1 has 10 bytes, not 4096"},
		{"short page via Page", func(e *ChunkEncoder) { e.Page(1, page[:10], page) }, "state: page 0x1 has 4096 bytes (old version 10), not 4096"},
		{"pfn overflow", func(e *ChunkEncoder) { e.Raw(1<<60, page) }, "state: page frame 0x1000000000000000 out of range"},
		{"dup source overflow", func(e *ChunkEncoder) { e.Dup(1, 1<<60) }, "state: dup source page frame 0x1000000000000000 out of range"},
		{"long delta", func(e *ChunkEncoder) { e.Delta(1, make([]byte, MaxDeltaLength+1)) }, "state: delta of 4095 bytes for page 0x1, at most 4094 allowed"},
		{"bad delta", func(e *ChunkEncoder) { e.Delta(1, []byte{1}) }, "state: delta for page 0x1: xbzrle: delta byte 1: changed-byte count truncated"},
		{"too many", func(e *ChunkEncoder) {
			for i := range ChunkPages + 1 {
				e.Zero(uint64(i))
			}
		}, "state: more than 256 page records in a chunk"},
		{"after finish", func(e *ChunkEncoder) {
			e.Zero(1)
			e.Finish()
			e.Zero(2)
		}, "state: page record added to a finished chunk (Reset first)"},
	} {
		e, err := NewChunkEncoder(CodecZstd, 0)
		if err != nil {
			t.Fatal(err)
		}
		c.add(e)
		if _, err := e.Finish(); err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
		if e.Err() == nil {
			t.Errorf("%s: Err is nil", c.name)
		}
		// Reset forgets the error.
		e.Reset()
		e.Raw(1, page)
		if b, err := e.Finish(); err != nil || len(b) == 0 {
			t.Errorf("%s: after Reset: %v", c.name, err)
		}
		e.Close()
	}
	// A full chunk takes no more records, and the ones it has survive.
	e, _ := NewChunkEncoder(CodecNone, 0)
	for i := range ChunkPages {
		e.Zero(uint64(i))
	}
	if !e.Full() || e.Len() != ChunkPages {
		t.Fatal("not full")
	}
}

// Workers encode and apply chunks in parallel, each with its own encoder
// and decoder, into disjoint parts of one memory image.
func TestChunkParallel(t *testing.T) {
	regions := testLayout()
	rng := rand.New(rand.NewPCG(110, 111))
	mem, _ := testMemory(rng)
	want := bytes.Clone(mem)
	const workers = 4
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(112, uint64(w)))
			codec, level, _ := ParseCodec(testCodecs[w%len(testCodecs)+1])
			e, err := NewChunkEncoder(codec, level)
			if err != nil {
				errs <- err
				return
			}
			defer e.Close()
			var dec ChunkDecoder
			defer dec.Close()
			for range 10 {
				e.Reset()
				// Worker w owns the pages whose frame is w modulo workers.
				for range 1 + rng.IntN(ChunkPages) {
					pfn := randPFN(rng)
					pfn -= pfn % workers
					pfn += uint64(w)
					cur := pageAt(t, want, pfn*PageSize)
					next := touch(rng, cur, 2)
					if rng.IntN(3) == 0 {
						next = textPage(rng)
					}
					e.Page(pfn, cur, next)
					copy(cur, next)
				}
				b, err := e.Finish()
				if err == nil {
					_, err = ApplyPageChunk(b, regions, mem, &dec)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if !bytes.Equal(mem, want) {
		t.Fatal("memory differs")
	}
}

// An lz4 chunk that lies about its size costs no more than the input
// holds.
func TestLZ4AllocationBounded(t *testing.T) {
	regions := testLayout()
	mem := make([]byte, 2<<20)
	for _, c := range []struct {
		name  string
		chunk []byte
	}{
		{"claims the limit", sealChunk(t, SectionRequired|SectionLZ4, append(le.AppendUint32(nil, MaxChunkLength), 1, 2, 3, 4, 5, 6, 7, 8))},
		{"claims 4 GiB", sealChunk(t, SectionRequired|SectionLZ4, append(le.AppendUint32(nil, 0xffffffff), 1, 2, 3, 4))},
	} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := ApplyPageChunk(c.chunk, regions, mem, NewChunkDecoder())
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 256<<10 {
			t.Errorf("%s: allocated %d bytes", c.name, alloc)
		}
	}
}
