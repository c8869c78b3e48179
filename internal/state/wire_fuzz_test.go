package state

import (
	"bytes"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// fuzzWireMachine is the small machine the wire fuzzers decode against.
func fuzzWireMachine() *Machine {
	m := randomMachine(rand.New(rand.NewPCG(85, 86)), 2, 32)
	for i := range m.VCPUs {
		m.VCPUs[i].MSRs = m.VCPUs[i].MSRs[:2]
		m.VCPUs[i].CPUID = m.VCPUs[i].CPUID[:2]
	}
	m.Header.CPUIDFingerprint = CPUIDFingerprint(m.VCPUs[0].CPUID)
	return m
}

// FuzzDecodeMachine feeds arbitrary machine sections to DecodeMachine: it
// must never panic, its errors are FormatErrors, and what it accepts
// re-encodes to a machine that decodes identically. Each input is decoded
// as is and with checksums ignored, so that mutations reach the payload
// decoders.
func FuzzDecodeMachine(f *testing.F) {
	m := fuzzWireMachine()
	b, err := EncodeMachine(m)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	spans := machineSpans(f, b)
	f.Add(bytes.Join([][]byte{spans[5], spans[1], spans[0], spans[3], spans[2], spans[4]}, nil))
	opt, _, _ := sealSection(sectionTestBase, 0, append(newSection(3), 1, 2, 3))
	f.Add(append(bytes.Clone(b), opt...))
	f.Add(spans[0])
	m.PCI = testPCI()
	withPCI, err := EncodeMachine(m)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(withPCI)
	h := m.Header
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, skip := range []bool{false, true} {
			got, _, err := decodeMachine(data, h, skip)
			if err != nil {
				if _, ok := err.(*FormatError); !ok {
					t.Fatalf("skip %v: error of type %T: %v", skip, err, err)
				}
				continue
			}
			re, err := EncodeMachine(got)
			if err != nil {
				t.Fatalf("skip %v: decoded machine does not encode: %v", skip, err)
			}
			again, _, err := DecodeMachine(re, h)
			if err != nil {
				t.Fatalf("skip %v: re-encoded machine refused: %v", skip, err)
			}
			if !reflect.DeepEqual(again, got) {
				t.Fatalf("skip %v: re-encoding changed the machine: %v", skip, Diff(got, again, true))
			}
		}
	})
}

// FuzzDecodePageChunk feeds arbitrary chunks to DecodePageChunk: it must
// never panic, hand over only whole pages inside the layout, report as many
// pages as it handed over, and what it accepts re-encodes to a chunk with
// the same pages.
func FuzzDecodePageChunk(f *testing.F) {
	h := fuzzWireMachine().Header
	page := bytes.Repeat([]byte("ferry!"), PageSize/6+1)[:PageSize]
	// Small seeds: one of each record encoding, raw and compressed.
	for _, c := range []struct {
		pfns     []uint64
		pages    [][]byte
		compress bool
	}{
		{[]uint64{1, 0x100000}, [][]byte{page, make([]byte, PageSize)}, false},
		{[]uint64{2, 0x100001, 2}, [][]byte{page, make([]byte, PageSize), page}, true},
		{[]uint64{7}, [][]byte{make([]byte, PageSize)}, false},
	} {
		b, err := EncodePageChunk(c.pfns, c.pages, c.compress, 0)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	// lz4, and the records DecodePageChunk refuses.
	for _, s := range fuzzApplySeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, skip := range []bool{false, true} {
			var pfns []uint64
			var pages [][]byte
			n, err := decodePageChunk(data, h, func(gpa uint64, d []byte) error {
				if len(d) != PageSize || gpa%PageSize != 0 || regionOf(h.Regions, gpa) < 0 {
					t.Fatalf("bad page %#x (%d bytes)", gpa, len(d))
				}
				pfns, pages = append(pfns, gpa/PageSize), append(pages, bytes.Clone(d))
				return nil
			}, skip)
			if err != nil {
				if _, ok := err.(*FormatError); !ok {
					t.Fatalf("skip %v: error of type %T: %v", skip, err, err)
				}
				continue
			}
			if n != len(pfns) || n < 1 || n > ChunkPages {
				t.Fatalf("skip %v: %d pages reported, %d handed over", skip, n, len(pfns))
			}
			re, err := EncodePageChunk(pfns, pages, false, 0)
			if err != nil {
				t.Fatalf("skip %v: pages do not encode: %v", skip, err)
			}
			i := 0
			if _, err := DecodePageChunk(re, h, func(gpa uint64, d []byte) error {
				if gpa != pfns[i]*PageSize || !bytes.Equal(d, pages[i]) {
					t.Fatalf("skip %v: page %d changed on re-encoding", skip, i)
				}
				i++
				return nil
			}); err != nil || i != n {
				t.Fatalf("skip %v: re-encoded chunk: %v after %d pages", skip, err, i)
			}
		}
	})
}

// fuzzApplyLayout is the small layout FuzzApplyPageChunk applies chunks
// to: 16 pages at 0 and 16 at 4 GiB, with a guard page after each in the
// memory image that no chunk may touch.
func fuzzApplyLayout() (regions []guestmem.Region, memSize int, guards []int) {
	return []guestmem.Region{
		{GPA: 0, Size: 16 * PageSize, Offset: 0},
		{GPA: 1 << 32, Size: 16 * PageSize, Offset: 17 * PageSize},
	}, 34 * PageSize, []int{16 * PageSize, 33 * PageSize}
}

// fuzzApplySeeds are small chunks of every record encoding in every codec,
// for pages of fuzzApplyLayout.
func fuzzApplySeeds(t testing.TB) [][]byte {
	rng := rand.New(rand.NewPCG(87, 88))
	text := bytes.Repeat([]byte("ferry!"), PageSize/6+1)[:PageSize]
	old := bytes.Clone(text)
	for i := 100; i < 4000; i += 301 {
		old[i] ^= 0x21
	}
	var seeds [][]byte
	for _, name := range []string{"none", "zstd", "lz4", "lz4:hc"} {
		codec, level, err := ParseCodec(name)
		if err != nil {
			t.Fatal(err)
		}
		e, err := NewChunkEncoder(codec, level)
		if err != nil {
			t.Fatal(err)
		}
		e.Raw(1, text)
		e.Raw(1<<20+3, text)
		e.Zero(2)
		e.Page(3, old, text)
		e.Dup(4, 1<<20+3)
		e.Raw(5, randBytes(rng, PageSize))
		b, err := e.Finish()
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, bytes.Clone(b))
		e.Close()
	}
	return seeds
}

// FuzzApplyPageChunk applies arbitrary chunks to a small memory image: it
// must never panic, never write outside the layout's pages, leave memory
// untouched when it refuses a chunk (with a FormatError), and agree with
// DecodePageChunk on chunks of raw and zero records.
func FuzzApplyPageChunk(f *testing.F) {
	for _, s := range fuzzApplySeeds(f) {
		f.Add(s)
	}
	regions, size, guards := fuzzApplyLayout()
	h := fuzzWireMachine().Header
	h.Regions, h.MemSize = regions, uint64(size)
	rng := rand.New(rand.NewPCG(89, 90))
	base := randBytes(rng, size)
	var dec ChunkDecoder
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, skip := range []bool{false, true} {
			mem := bytes.Clone(base)
			n, err := dec.apply(data, regions, mem, skip)
			for _, g := range guards {
				if !bytes.Equal(mem[g:g+PageSize], base[g:g+PageSize]) {
					t.Fatalf("skip %v: guard page at %#x written", skip, g)
				}
			}
			if err != nil {
				if _, ok := err.(*FormatError); !ok {
					t.Fatalf("skip %v: error of type %T: %v", skip, err, err)
				}
				if !bytes.Equal(mem, base) {
					t.Fatalf("skip %v: refused chunk changed memory: %v", skip, err)
				}
				continue
			}
			if n < 1 || n > ChunkPages {
				t.Fatalf("skip %v: %d records", skip, n)
			}
			// A chunk DecodePageChunk accepts too has only raw and zero
			// records: laying its pages out gives the same memory.
			want := bytes.Clone(base)
			m, derr := decodePageChunk(data, h, func(gpa uint64, d []byte) error {
				off, _ := layoutOffset(regions, gpa)
				copy(want[off:off+PageSize], d)
				return nil
			}, skip)
			if derr == nil && (m != n || !bytes.Equal(want, mem)) {
				t.Fatalf("skip %v: ApplyPageChunk and DecodePageChunk disagree", skip)
			}
		}
	})
}
