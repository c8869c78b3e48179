package state

import (
	"bytes"
	"math/rand/v2"
	"reflect"
	"testing"
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
