package state

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
	"reflect"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/ferry-vmm/ferry/internal/xbzrle"
)

// fuzzSeeds are small but complete encodings: every section type (the
// PCI section included), memory chunks uncompressed, zstd- and
// lz4-compressed, an unknown optional section.
func fuzzSeeds(t testing.TB) [][]byte {
	rng := rand.New(rand.NewPCG(41, 42))
	m := randomMachine(rng, 1, 0)
	m.VCPUs[0].CPUID = m.VCPUs[0].CPUID[:2]
	m.VCPUs[0].MSRs = m.VCPUs[0].MSRs[:3]
	m.Header.CPUIDFingerprint = CPUIDFingerprint(m.VCPUs[0].CPUID)
	page := bytes.Repeat([]byte("ferry!"), PageSize/6+1)[:PageSize]
	var seeds [][]byte
	for i, opts := range []WriterOptions{{}, {Compress: true}, {Compress: true, Codec: CodecLZ4}} {
		compress := opts.Compress
		var buf bytes.Buffer
		w, err := NewWriter(&buf, m.Header, opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteMachine(m); err != nil {
			t.Fatal(err)
		}
		pfns, pages := []uint64{1, 2}, [][]byte{page, make([]byte, PageSize)}
		if compress {
			pfns, pages = append(pfns, 0x100000), append(pages, page)
		}
		if err := w.WritePages(pfns, pages); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			w.writeSection(sectionTestBase, 0, []byte{1, 2, 3})
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, buf.Bytes())
	}
	withPCI := *m
	withPCI.PCI = testPCI()
	seeds = append(seeds, encode(t, &withPCI, nil, WriterOptions{}))
	return seeds
}

// FuzzReader feeds arbitrary streams to the reader: it must never panic,
// and whatever it accepts must survive re-encoding unchanged. Every input
// is read twice: as is, and with checksums ignored so that mutations reach
// the payload decoders.
func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, skip := range []bool{false, true} {
			got, err := decode(data, ReaderOptions{skipChecksums: skip})
			if err != nil {
				if _, ok := err.(*FormatError); !ok {
					t.Fatalf("skip %v: error of type %T: %v", skip, err, err)
				}
				continue
			}
			h := got.m.Header
			re := encode(t, &got.m, nil, WriterOptions{})
			again, err := decode(re, ReaderOptions{})
			if err != nil {
				t.Fatalf("skip %v: re-encoded stream refused: %v", skip, err)
			}
			if !reflect.DeepEqual(again.m, got.m) {
				t.Fatalf("skip %v: re-encoding changed the machine: %v", skip, Diff(&got.m, &again.m, true))
			}
			if h.MemSize == 0 {
				t.Fatal("accepted a header without memory")
			}
		}
	})
}

// FuzzPayloads feeds arbitrary payloads straight to each section decoder.
func FuzzPayloads(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		_, spans := layoutOf(f, s)
		for _, sp := range spans {
			payload := s[sp.start+sectionHeaderSize : sp.end-crcSize]
			if sp.typ == SectionMemory && binary.LittleEndian.Uint16(s[sp.start+2:])&SectionZstd != 0 {
				f.Add(uint8(0x80), payload) // compressed: decompress, then decode
				continue
			}
			if sp.typ == SectionMemory && binary.LittleEndian.Uint16(s[sp.start+2:])&SectionLZ4 != 0 {
				f.Add(uint8(0x81), payload)
				continue
			}
			f.Add(uint8(sp.typ), payload)
		}
		hlen := binary.LittleEndian.Uint32(s[12:])
		f.Add(uint8(0xf0), s[prefixSize:prefixSize+hlen])
	}
	regions := testLayout()
	f.Fuzz(func(t *testing.T, kind uint8, p []byte) {
		var m Machine
		switch kind {
		case uint8(SectionVCPU):
			v, _, err := decodeVCPU(p)
			if err == nil {
				b, err := encodeVCPU(nil, &v)
				if err != nil {
					t.Fatalf("decoded vCPU does not encode: %v", err)
				}
				v2, _, err := decodeVCPU(b)
				if err != nil || !reflect.DeepEqual(v, v2) {
					t.Fatalf("vCPU does not round-trip: %v", err)
				}
			}
		case uint8(SectionIRQChip):
			decodeIRQChip(p, &m)
		case uint8(SectionPIT):
			decodePIT(p, &m)
		case uint8(SectionClock):
			decodeClock(p, &m)
		case uint8(SectionDevices):
			if _, err := decodeDevices(p, &m.Devices); err == nil {
				b, err := encodeDevices(nil, &m.Devices)
				if err != nil {
					t.Fatal(err)
				}
				var d Devices
				if _, err := decodeDevices(b, &d); err != nil || !reflect.DeepEqual(d, m.Devices) {
					t.Fatalf("devices do not round-trip: %v", err)
				}
			}
		case uint8(SectionPCI):
			if p1, _, err := decodePCI(p); err == nil {
				b, err := encodePCI(nil, p1)
				if err != nil {
					t.Fatalf("decoded PCI state does not encode: %v", err)
				}
				p2, _, err := decodePCI(b)
				if err != nil || !reflect.DeepEqual(p1, p2) {
					t.Fatalf("PCI state does not round-trip: %v", err)
				}
			}
		case uint8(SectionMemory), 0x80, 0x81:
			if kind != uint8(SectionMemory) {
				r := &Reader{}
				var out []byte
				var err error
				if kind == 0x80 {
					out, err = r.decompress(p)
				} else {
					out, err = r.decompressLZ4(p)
				}
				r.closeDecoder()
				if err != nil {
					return
				}
				if len(out) > MaxChunkLength {
					t.Fatalf("decompressed %d bytes", len(out))
				}
				p = out
			}
			for _, refs := range []bool{false, true} {
				parseChunk(p, regions, refs, func(r pageRecord) error {
					if regionOf(regions, r.gpa) < 0 || r.gpa%PageSize != 0 {
						t.Fatalf("bad page %#x", r.gpa)
					}
					switch r.enc {
					case PageZero, PageRaw:
						if len(r.data) != PageSize {
							t.Fatalf("page %#x: %d bytes", r.gpa, len(r.data))
						}
					case PageDelta, PageDup:
						if !refs {
							t.Fatalf("page %#x: encoding %d accepted without memory", r.gpa, r.enc)
						}
						if r.enc == PageDelta && (len(r.data) > MaxDeltaLength || xbzrle.Check(r.data, PageSize) != nil) {
							t.Fatalf("page %#x: bad delta accepted", r.gpa)
						}
						if r.enc == PageDup && r.from >= 2<<20 {
							t.Fatalf("page %#x: dup source offset %#x", r.gpa, r.from)
						}
					default:
						t.Fatalf("page %#x: encoding %d", r.gpa, r.enc)
					}
					if r.off >= 2<<20 {
						t.Fatalf("page %#x: offset %#x", r.gpa, r.off)
					}
					return nil
				})
			}
		case 0xf0:
			if h, err := decodeHeader(p); err == nil && validateHeader(&h) == nil {
				h2, err := decodeHeader(encodeHeader(&h))
				if err != nil || !reflect.DeepEqual(h, h2) {
					t.Fatalf("header does not round-trip: %v", err)
				}
			}
		}
	})
}

// Length fields never make the reader allocate beyond what the input
// holds (plus fixed bounds): lying lengths in a tiny input cost little.
func TestAllocationBounded(t *testing.T) {
	rng := rand.New(rand.NewPCG(43, 44))
	m := randomMachine(rng, 1, 0)
	valid := encode(t, m, nil, WriterOptions{})
	headerEnd, _ := layoutOf(t, valid)

	section := func(typ, flags uint16, length uint64, payload []byte) []byte {
		b := append([]byte(nil), valid[:headerEnd]...)
		s := binary.LittleEndian.AppendUint16(nil, typ)
		s = binary.LittleEndian.AppendUint16(s, flags)
		s = binary.LittleEndian.AppendUint64(s, length)
		s = append(s, payload...)
		if uint64(len(payload)) == length {
			s = binary.LittleEndian.AppendUint32(s, crc32.Checksum(s, castagnoli))
		}
		return append(b, s...)
	}
	bigHeader := append([]byte(nil), valid[:prefixSize]...)
	binary.LittleEndian.PutUint32(bigHeader[12:], MaxHeaderLength)

	// A zstd frame that claims (and would produce) far more than a chunk.
	enc, _ := zstd.NewWriter(nil)
	bomb := enc.EncodeAll(make([]byte, 64<<20), nil)
	enc.Close()
	enc, _ = zstd.NewWriter(nil, zstd.WithWindowSize(512<<10))
	bomb2 := enc.EncodeAll(make([]byte, 2<<20), nil)
	enc.Close()

	// A vCPU record claiming 4 GiB.
	rec := binary.LittleEndian.AppendUint32(nil, 0)
	rec = binary.LittleEndian.AppendUint16(rec, TagXSave)
	rec = binary.LittleEndian.AppendUint32(rec, 0xffffffff)

	for _, c := range []struct {
		name string
		data []byte
	}{
		{"section claiming 16 MiB", section(SectionVCPU, 1, MaxSectionLength, []byte{1, 2, 3})},
		{"section claiming 2^63", section(sectionTestBase, 0, 1<<63, nil)},
		{"chunk claiming the maximum", section(SectionMemory, 1, MaxChunkLength, []byte{1})},
		{"header claiming 64 KiB", bigHeader},
		{"zstd bomb", section(SectionMemory, 3, uint64(len(bomb)), bomb)},
		{"zstd bomb, small window", section(SectionMemory, 3, uint64(len(bomb2)), bomb2)},
		{"record claiming 4 GiB", section(SectionVCPU, 1, uint64(len(rec)), rec)},
	} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := decode(c.data, ReaderOptions{})
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
		}
		alloc := after.TotalAlloc - before.TotalAlloc
		// The zstd decoder's own tables and a chunk-sized output buffer
		// are the fixed part; everything else scales with the input.
		limit := uint64(4<<20) + 4*uint64(len(c.data))
		if alloc > limit {
			t.Errorf("%s (%d bytes): allocated %d bytes", c.name, len(c.data), alloc)
		}
		t.Logf("%s (%d bytes): %v; allocated %d bytes", c.name, len(c.data), err, alloc)
	}
}
