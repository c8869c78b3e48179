package virtio

import (
	"errors"
	"syscall"
	"testing"
)

// extraMalformedCases add to malformedCases (queue of 8, fakeMem RAM
// [testBase, testBase+testSize)) the edges a hostile driver would try.
// TestMalformedChains' sibling below and TestHostileDriverTransport run
// them all.
var extraMalformedCases = []malformedCase{
	{name: "head 0xffff", want: ErrDescIndex, setup: func(r *ring) {
		r.publish(0xffff)
	}},
	{name: "head equal to the size", want: ErrDescIndex, setup: func(r *ring) {
		r.publish(8)
	}},
	{name: "NEXT 0xffff", want: ErrDescIndex, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext|descFWrite, 0xffff)
		r.publish(0)
	}},
	{name: "loop of zero-length descriptors", want: ErrChainLoop, setup: func(r *ring) {
		r.setDesc(0, 0, 0, descFNext|descFWrite, 1)
		r.setDesc(1, 0, 0, descFNext|descFWrite, 0)
		r.publish(0)
	}},
	{name: "loop back to the head after the whole table", want: ErrChainLoop, setup: func(r *ring) {
		for i := uint16(0); i < 8; i++ {
			r.setDesc(i, bufGPA+0x100*uint64(i), 8, descFNext|descFWrite, (i+1)%8)
		}
		r.publish(0)
	}},
	{name: "indirect table of size+1 entries", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 9*descSize, descFIndirect, 0)
		for i := uint16(0); i < 9; i++ {
			r.setDescAt(tableGPA, i, bufGPA, 8, descFWrite, 0)
		}
		r.publish(0)
	}},
	{name: "indirect length 2^32-16", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 0xffff_fff0, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect length 15", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 15, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect table across the end of RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, testBase+testSize-descSize, 2*descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect with NEXT and WRITE, in a chain", want: ErrIndirectNext, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext, 1)
		r.setDesc(1, tableGPA, descSize, descFIndirect|descFNext|descFWrite, 2)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "nested indirect at the end of a table", want: ErrIndirectNested, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 2*descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFNext, 1)
		r.setDescAt(tableGPA, 1, tableGPA+0x100, descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "direct then indirect over the queue size", want: ErrChainLoop, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext, 1)
		r.setDesc(1, tableGPA, 8*descSize, descFIndirect, 0)
		for i := uint16(0); i < 8; i++ {
			r.setDescAt(tableGPA, i, bufGPA, 8, descFNext|descFWrite, i+1)
		}
		r.setDescAt(tableGPA, 7, bufGPA, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "writable direct then readable indirect", want: ErrWriteOrder, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext|descFWrite, 1)
		r.setDesc(1, tableGPA, descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA+8, 8, 0, 0)
		r.publish(0)
	}},
	{name: "buffer below RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, testBase-8, 16, descFWrite, 0)
		r.publish(0)
	}},
	{name: "buffer just past the end of RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, testBase+testSize, 1, descFWrite, 0)
		r.publish(0)
	}},
	{name: "buffer of 2^32-1 bytes", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, testBase, 0xffff_ffff, descFWrite, 0)
		r.publish(0)
	}},
	{name: "buffer ending exactly at 2^64", want: ErrBufferWraps, setup: func(r *ring) {
		r.setDesc(0, 0xffff_ffff_ffff_ff00, 0x100, descFWrite, 0)
		r.publish(0)
	}},
	{name: "readable buffer wraps", want: ErrBufferWraps, setup: func(r *ring) {
		r.setDesc(0, 0xffff_ffff_8000_0000, 0xffff_ffff, 0, 0)
		r.publish(0)
	}},
	{name: "buffer in RAM then one outside", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext|descFWrite, 1)
		r.setDesc(1, 0x10, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "available index size+1 ahead", want: ErrAvailIndex, setup: func(r *ring) {
		r.m.put16(r.avail+2, 9)
	}},
	{name: "available index behind the device", want: ErrAvailIndex, setup: func(r *ring) {
		r.m.put16(r.avail+2, 0xffff)
	}},
	{name: "bad chain after good ones", want: ErrDescIndex, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFWrite, 0)
		r.setDesc(1, bufGPA+8, 8, descFNext|descFWrite, 9)
		r.publish(0, 1)
	}},
}

// TestMoreMalformedChains runs extraMalformedCases against a Queue, with
// and without EVENT_IDX: each is refused with its reason, and nothing is
// written but the buffers and used ring of chains popped before it.
func TestMoreMalformedChains(t *testing.T) {
	for _, tc := range extraMalformedCases {
		for _, eventIdx := range []uint64{0, FeatureEventIdx} {
			t.Run(tc.name, func(t *testing.T) {
				m, r, q := startedQueue(t, 8, tc.negotiated()|eventIdx)
				tc.setup(r)
				var err error
				var popped []*Chain
				for range 9 {
					var c *Chain
					if c, err = q.Pop(); c == nil || err != nil {
						break
					}
					popped = append(popped, c)
					if _, err := c.WriteAt(make([]byte, 8), 0); err != nil {
						t.Fatal(err)
					}
					if err := q.Push(c.Head, 8); err != nil {
						t.Fatal(err)
					}
				}
				if !errors.Is(err, tc.want) {
					t.Fatalf("Pop = %v; want %v", err, tc.want)
				}
				allowed := []Buffer{{GPA: usedGPA, Len: 6 + usedElemSize*8}}
				for _, c := range popped {
					allowed = append(allowed, c.Writable...)
				}
				for _, gpa := range m.deviceWrites() {
					in := false
					for _, a := range allowed {
						in = in || gpa >= a.GPA && gpa-a.GPA < uint64(a.Len)
					}
					if !in {
						t.Fatalf("byte %#x written", gpa)
					}
				}
				m.checkDirtyCovers(t)
			})
		}
	}
}

// TestChainLimits: what sits exactly at a limit is accepted.
func TestChainLimits(t *testing.T) {
	cases := []struct {
		name  string
		setup func(r *ring)
		check func(t *testing.T, c *Chain)
	}{
		{"chain of the queue size", func(r *ring) {
			for i := uint16(0); i < 8; i++ {
				r.setDesc(i, bufGPA+0x100*uint64(i), 8, descFNext, i+1)
			}
			r.setDesc(7, bufGPA+0x700, 8, descFWrite, 0)
			r.publish(0)
		}, func(t *testing.T, c *Chain) {
			if len(c.Readable) != 7 || len(c.Writable) != 1 {
				t.Fatalf("%d readable, %d writable", len(c.Readable), len(c.Writable))
			}
		}},
		{"indirect table of the queue size", func(r *ring) {
			r.setDesc(0, tableGPA, 8*descSize, descFIndirect, 0)
			for i := uint16(0); i < 8; i++ {
				r.setDescAt(tableGPA, i, bufGPA+0x100*uint64(i), 8, descFNext|descFWrite, i+1)
			}
			r.setDescAt(tableGPA, 7, bufGPA+0x700, 8, descFWrite, 0)
			r.publish(0)
		}, func(t *testing.T, c *Chain) {
			if len(c.Writable) != 8 {
				t.Fatalf("%d writable", len(c.Writable))
			}
		}},
		{"zero-length descriptors anywhere are dropped", func(r *ring) {
			r.setDesc(0, 0xffff_ffff_ffff_fff0, 0, descFNext, 1)
			r.setDesc(1, bufGPA, 4, descFNext|descFWrite, 2)
			r.setDesc(2, 0, 0, descFWrite, 0)
			r.publish(0)
		}, func(t *testing.T, c *Chain) {
			if len(c.Readable) != 0 || len(c.Writable) != 1 || c.WritableLen() != 4 {
				t.Fatalf("chain %+v", c)
			}
		}},
		{"buffer ending at the end of RAM", func(r *ring) {
			r.setDesc(0, testBase+testSize-16, 16, descFWrite, 0)
			r.publish(0)
		}, func(t *testing.T, c *Chain) {
			if c.WritableLen() != 16 {
				t.Fatalf("chain %+v", c)
			}
		}},
		{"available index exactly the size ahead", func(r *ring) {
			for i := uint16(0); i < 8; i++ {
				r.setDesc(i, bufGPA+0x100*uint64(i), 8, descFWrite, 0)
			}
			r.publish(0, 1, 2, 3, 4, 5, 6, 7)
		}, func(t *testing.T, c *Chain) {}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, r, q := startedQueue(t, 8, testFeatures)
			tc.setup(r)
			c, err := q.Pop()
			if err != nil || c == nil {
				t.Fatalf("Pop = %v, %v", c, err)
			}
			tc.check(t, c)
		})
	}
}

// TestAvailIndexWraps: the indices are free-running 16-bit counters; a
// device near 0xffff must follow the driver across the wrap, and still
// refuse a jump of more than the size.
func TestAvailIndexWraps(t *testing.T) {
	_, r, q := startedQueue(t, 8, testFeatures|FeatureEventIdx)
	q.nextAvail, q.nextUsed = 0xfffe, 0xfffe
	r.availIdx = 0xfffe
	for i := uint16(0); i < 4; i++ {
		r.setDesc(i, bufGPA+0x100*uint64(i), 8, descFWrite, 0)
	}
	r.publish(0, 1, 2, 3) // slots 6, 7, 0, 1; avail.idx 2
	for i := uint16(0); i < 4; i++ {
		c, err := q.Pop()
		if err != nil || c == nil || c.Head != i {
			t.Fatalf("Pop %d = %v, %v", i, c, err)
		}
		if err := q.Push(c.Head, 8); err != nil {
			t.Fatal(err)
		}
	}
	if r.usedIdx() != 2 {
		t.Fatalf("used.idx = %d, want 2", r.usedIdx())
	}
	if id, _ := r.usedElem(0xffff); id != 1 {
		t.Fatalf("used slot 7 holds %d, want 1", id)
	}
	if c, err := q.Pop(); c != nil || err != nil || r.availEvent() != 2 {
		t.Fatalf("Pop = %v, %v; avail_event %d", c, err, r.availEvent())
	}
	r.m.put16(r.avail+2, 2+9)
	if _, err := q.Pop(); !errors.Is(err, ErrAvailIndex) {
		t.Fatalf("Pop after a jump of 9 = %v", err)
	}
}

// sparseMem is guest RAM [0, size) in a mapping that is reserved but
// mostly never touched, so that chains of gigabytes can be described.
type sparseMem struct{ data []byte }

func newSparseMem(t *testing.T, size uint64) *sparseMem {
	data, err := syscall.Mmap(-1, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE,
		syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS|syscall.MAP_NORESERVE)
	if err != nil {
		t.Skipf("cannot reserve %#x bytes: %v", size, err)
	}
	t.Cleanup(func() { syscall.Munmap(data) })
	return &sparseMem{data: data}
}

func (m *sparseMem) Slice(gpa, n uint64) ([]byte, error) {
	if gpa > uint64(len(m.data)) || n > uint64(len(m.data))-gpa {
		return nil, errors.New("not RAM")
	}
	return m.data[gpa : gpa+n : gpa+n], nil
}

// TestChainTooBig: a chain naming more than MaxChainBytes is refused, one
// naming exactly MaxChainBytes is not (and costs one Buffer).
func TestChainTooBig(t *testing.T) {
	mem := newSparseMem(t, 1<<32+1<<20)
	var dirty []span
	q, err := NewQueue(0, 8, mem, func(gpa, n uint64) { dirty = append(dirty, span{gpa, n}) })
	if err != nil {
		t.Fatal(err)
	}
	const desc, avail, used = 0x1000, 0x2000, 0x3000
	if err := q.Start(8, RingAddrs{desc, avail, used}, testFeatures); err != nil {
		t.Fatal(err)
	}
	fm := &fakeMem{base: 0, data: mem.data, shadow: make([]byte, 0x4000)}
	r := &ring{m: fm, size: 8, desc: desc, avail: avail, used: used}
	r.setDesc(0, 0x10000, 0xffff_ffff, descFNext, 1)
	r.setDesc(1, 0x10000, 0, descFNext|descFWrite, 2) // zero length: no bytes
	r.setDesc(2, 0x10000, 1, descFWrite, 0)
	r.setDesc(3, 0x10000, 0xffff_ffff, descFWrite, 0)
	r.publish(0)
	if _, err := q.Pop(); !errors.Is(err, ErrChainTooBig) {
		t.Fatalf("Pop of 2^32 bytes = %v", err)
	}
	q.stop()
	if err := q.Start(8, RingAddrs{desc, avail, used}, testFeatures); err != nil {
		t.Fatal(err)
	}
	r.availIdx = 0
	r.publish(3)
	c, err := q.Pop()
	if err != nil || len(c.Writable) != 1 || c.WritableLen() != MaxChainBytes {
		t.Fatalf("Pop of 2^32-1 bytes = %+v, %v", c, err)
	}
	if len(dirty) != 0 {
		t.Fatalf("popping wrote %v", dirty)
	}
}
