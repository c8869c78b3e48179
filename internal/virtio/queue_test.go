package virtio

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

const testFeatures = FeatureVersion1 | FeatureIndirectDesc

func startedQueue(t *testing.T, size uint16, features uint64) (*fakeMem, *ring, *Queue) {
	t.Helper()
	m := newFakeMem(testBase, testSize)
	r := newRing(m, size)
	q, err := NewQueue(0, size, m, m.Dirty)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(size, r.addrs(), features); err != nil {
		t.Fatal(err)
	}
	return m, r, q
}

func TestPopPushRoundTrip(t *testing.T) {
	m, r, q := startedQueue(t, 8, testFeatures)
	m.write(bufGPA, []byte("0123456789abcdef"))
	r.setDesc(0, bufGPA, 16, descFNext, 1)
	r.setDesc(1, bufGPA+0x100, 0, descFNext|descFWrite, 5) // zero length: dropped
	r.setDesc(5, bufGPA+0x200, 32, descFWrite, 0)
	r.setDesc(2, bufGPA+0x300, 8, descFWrite, 0)
	r.publish(0, 2)

	c, err := q.Pop()
	if err != nil || c == nil {
		t.Fatalf("Pop = %v, %v", c, err)
	}
	if c.Head != 0 || len(c.Readable) != 1 || len(c.Writable) != 1 || c.ReadableLen() != 16 || c.WritableLen() != 32 {
		t.Fatalf("chain = %+v", c)
	}
	got := make([]byte, 10)
	if n, err := c.ReadAt(got, 6); n != 10 || err != nil || string(got) != "6789abcdef" {
		t.Fatalf("ReadAt = %d %v %q", n, err, got)
	}
	if n, err := c.ReadAt(got, 10); n != 6 || err != io.EOF {
		t.Fatalf("ReadAt past the end = %d, %v; want 6, EOF", n, err)
	}
	if n, err := c.WriteAt(bytes.Repeat([]byte{0xaa}, 40), 0); n != 32 || err != io.ErrShortWrite {
		t.Fatalf("WriteAt = %d, %v; want 32, ErrShortWrite", n, err)
	}
	if err := q.Push(c.Head, 32); err != nil {
		t.Fatal(err)
	}
	if id, n := r.usedElem(0); r.usedIdx() != 1 || id != 0 || n != 32 {
		t.Fatalf("used idx %d elem (%d, %d); want 1 (0, 32)", r.usedIdx(), id, n)
	}
	c2, err := q.Pop()
	if err != nil || c2 == nil || c2.Head != 2 || c2.WritableLen() != 8 {
		t.Fatalf("second Pop = %+v, %v", c2, err)
	}
	if err := q.Push(c2.Head, 0); err != nil {
		t.Fatal(err)
	}
	if c3, err := q.Pop(); c3 != nil || err != nil {
		t.Fatalf("Pop of an empty queue = %v, %v", c3, err)
	}
	m.checkDirtyCovers(t)
	if !bytes.Equal(m.at(bufGPA+0x200, 32), bytes.Repeat([]byte{0xaa}, 32)) {
		t.Fatal("writable buffer not written")
	}
	// Only the writable buffer and the used ring changed.
	for _, gpa := range m.deviceWrites() {
		inBuf := gpa >= bufGPA+0x200 && gpa < bufGPA+0x220
		inUsed := gpa >= usedGPA && gpa < usedGPA+6+8*8
		if !inBuf && !inUsed {
			t.Fatalf("byte %#x written outside the chain and the used ring", gpa)
		}
	}
}

func TestIndirectChains(t *testing.T) {
	m, r, q := startedQueue(t, 8, testFeatures)
	table := uint64(bufGPA + 0x1000)
	r.setDescAt(table, 0, bufGPA, 4, descFNext, 2)
	r.setDescAt(table, 2, bufGPA+0x10, 4, descFNext|descFWrite, 1)
	r.setDescAt(table, 1, bufGPA+0x20, 4, descFWrite, 0)
	// Head 0: the table alone (its WRITE flag is ignored). Head 1: a
	// direct descriptor, then the table.
	r.setDesc(0, table, 3*descSize, descFIndirect|descFWrite, 0)
	r.setDesc(1, bufGPA+0x30, 4, descFNext, 3)
	r.setDesc(3, table, 3*descSize, descFIndirect, 0)
	r.publish(0, 1)
	c, err := q.Pop()
	if err != nil || len(c.Readable) != 1 || len(c.Writable) != 2 || c.Writable[1].GPA != bufGPA+0x20 {
		t.Fatalf("indirect chain = %+v, %v", c, err)
	}
	c, err = q.Pop()
	if err != nil || len(c.Readable) != 2 || len(c.Writable) != 2 || c.Readable[0].GPA != bufGPA+0x30 {
		t.Fatalf("direct + indirect chain = %+v, %v", c, err)
	}
	_ = m
}

func TestEventIdxSuppression(t *testing.T) {
	m, r, q := startedQueue(t, 8, testFeatures|FeatureEventIdx)
	for i := uint16(0); i < 8; i++ {
		r.setDesc(i, bufGPA+0x100*uint64(i), 16, descFWrite, 0)
	}
	// Running dry asks for a notification at the next slot.
	if c, err := q.Pop(); c != nil || err != nil {
		t.Fatalf("Pop = %v, %v", c, err)
	}
	if r.availEvent() != 0 {
		t.Fatalf("avail_event = %d, want 0", r.availEvent())
	}
	r.publish(0, 1, 2, 3, 4, 5, 6)
	push := func(n int) {
		for range n {
			c, err := q.Pop()
			if err != nil || c == nil {
				t.Fatalf("Pop = %v, %v", c, err)
			}
			if err := q.Push(c.Head, 16); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.setUsedEvent(0)
	push(1) // used 0 -> 1 passes used_event 0
	if !q.NeedsInterrupt() {
		t.Fatal("used.idx passed used_event but no interrupt")
	}
	r.setUsedEvent(4)
	push(2) // 1 -> 3: used_event 4 not reached
	if q.NeedsInterrupt() {
		t.Fatal("interrupt before used_event")
	}
	push(2) // 3 -> 5: passes 4
	if !q.NeedsInterrupt() {
		t.Fatal("no interrupt after passing used_event")
	}
	if q.NeedsInterrupt() {
		t.Fatal("interrupt with nothing new pushed")
	}
	push(2)
	if c, _ := q.Pop(); c != nil {
		t.Fatal("Pop past the last published chain")
	}
	if r.availEvent() != 7 {
		t.Fatalf("avail_event = %d, want 7", r.availEvent())
	}
	m.checkDirtyCovers(t)
}

func TestNoInterruptFlag(t *testing.T) {
	_, r, q := startedQueue(t, 8, testFeatures)
	r.setDesc(0, bufGPA, 16, descFWrite, 0)
	for _, suppress := range []bool{true, false} {
		r.publish(0)
		c, err := q.Pop()
		if err != nil || c == nil {
			t.Fatalf("Pop = %v, %v", c, err)
		}
		if err := q.Push(c.Head, 0); err != nil {
			t.Fatal(err)
		}
		flags := uint16(0)
		if suppress {
			flags = availFNoInterrupt
		}
		r.setAvailFlags(flags)
		if got := q.NeedsInterrupt(); got == suppress {
			t.Fatalf("NO_INTERRUPT=%v: NeedsInterrupt = %v", suppress, got)
		}
	}
}

func TestPopWhileHalted(t *testing.T) {
	_, r, q := startedQueue(t, 8, testFeatures)
	r.setDesc(0, bufGPA, 16, descFWrite, 0)
	r.publish(0)
	q.halt.Add(1)
	if c, err := q.Pop(); c != nil || err != nil {
		t.Fatalf("Pop while halted = %v, %v", c, err)
	}
	q.halt.Add(-1)
	if c, err := q.Pop(); c == nil || err != nil {
		t.Fatalf("Pop after halt = %v, %v", c, err)
	}
}

func TestPushChecks(t *testing.T) {
	_, _, q := startedQueue(t, 8, testFeatures)
	if err := q.Push(8, 0); !errors.Is(err, ErrDescIndex) {
		t.Fatalf("Push of head 8 = %v", err)
	}
	q2, _ := NewQueue(1, 8, newFakeMem(testBase, testSize), func(uint64, uint64) {})
	if err := q2.Push(0, 0); !errors.Is(err, ErrQueueNotReady) {
		t.Fatalf("Push on a stopped queue = %v", err)
	}
}

// malformedCase is a driver error in a queue of size 8 with a fakeMem.
type malformedCase struct {
	name     string
	features uint64 // beyond VERSION_1; testFeatures if 0
	setup    func(r *ring)
	want     error
}

const tableGPA = bufGPA + 0x8000 // indirect tables

var malformedCases = []malformedCase{
	{name: "loop", want: ErrChainLoop, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext, 1)
		r.setDesc(1, bufGPA, 8, descFNext, 0)
		r.publish(0)
	}},
	{name: "self loop", want: ErrChainLoop, setup: func(r *ring) {
		r.setDesc(3, bufGPA, 8, descFNext|descFWrite, 3)
		r.publish(3)
	}},
	{name: "longer than the queue size", want: ErrChainLoop, setup: func(r *ring) {
		for i := uint16(0); i < 3; i++ {
			r.setDesc(i, bufGPA, 8, descFNext, i+1)
		}
		r.setDesc(3, tableGPA, 8*descSize, descFIndirect, 0)
		for i := uint16(0); i < 8; i++ {
			r.setDescAt(tableGPA, i, bufGPA, 8, descFNext|descFWrite, i+1)
		}
		r.setDescAt(tableGPA, 7, bufGPA, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "indirect loop", want: ErrChainLoop, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 2*descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFNext, 1)
		r.setDescAt(tableGPA, 1, bufGPA, 8, descFNext, 0)
		r.publish(0)
	}},
	{name: "indirect length not a multiple of 16", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 24, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect length 0", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 0, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect table above the queue size", want: ErrIndirectLen, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 9*descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "nested indirect", want: ErrIndirectNested, setup: func(r *ring) {
		r.setDesc(0, tableGPA, descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, tableGPA, descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect with NEXT", want: ErrIndirectNext, setup: func(r *ring) {
		r.setDesc(0, tableGPA, descSize, descFIndirect|descFNext, 1)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "indirect not negotiated", features: FeatureVersion1, want: ErrIndirectNotNegotiated, setup: func(r *ring) {
		r.setDesc(0, tableGPA, descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "NEXT outside the table", want: ErrDescIndex, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext, 8)
		r.publish(0)
	}},
	{name: "NEXT outside the indirect table", want: ErrDescIndex, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 2*descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFNext, 5)
		r.publish(0)
	}},
	{name: "head outside the table", want: ErrDescIndex, setup: func(r *ring) {
		r.publish(9)
	}},
	{name: "buffer outside RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, 0x1000, 8, descFWrite, 0)
		r.publish(0)
	}},
	{name: "buffer across the end of RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, testBase+testSize-8, 16, descFWrite, 0)
		r.publish(0)
	}},
	{name: "buffer wraps", want: ErrBufferWraps, setup: func(r *ring) {
		r.setDesc(0, 0xffff_ffff_ffff_fff0, 0x20, descFWrite, 0)
		r.publish(0)
	}},
	{name: "indirect table outside RAM", want: ErrBufferNotRAM, setup: func(r *ring) {
		r.setDesc(0, 0x2000, 2*descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "indirect table wraps", want: ErrBufferWraps, setup: func(r *ring) {
		r.setDesc(0, 0xffff_ffff_ffff_fff0, 2*descSize, descFIndirect, 0)
		r.publish(0)
	}},
	{name: "writable before readable", want: ErrWriteOrder, setup: func(r *ring) {
		r.setDesc(0, bufGPA, 8, descFNext|descFWrite, 1)
		r.setDesc(1, bufGPA+8, 8, 0, 0)
		r.publish(0)
	}},
	{name: "writable before readable, indirect", want: ErrWriteOrder, setup: func(r *ring) {
		r.setDesc(0, tableGPA, 2*descSize, descFIndirect, 0)
		r.setDescAt(tableGPA, 0, bufGPA, 8, descFNext|descFWrite, 1)
		r.setDescAt(tableGPA, 1, bufGPA+8, 8, 0, 0)
		r.publish(0)
	}},
	{name: "available index jumps", want: ErrAvailIndex, setup: func(r *ring) {
		r.m.put16(r.avail+2, 9)
	}},
}

func (c malformedCase) negotiated() uint64 {
	if c.features == 0 {
		return testFeatures
	}
	return c.features
}

func TestMalformedChains(t *testing.T) {
	for _, tc := range malformedCases {
		t.Run(tc.name, func(t *testing.T) {
			m, r, q := startedQueue(t, 8, tc.negotiated())
			tc.setup(r)
			c, err := q.Pop()
			if c != nil || !errors.Is(err, tc.want) {
				t.Fatalf("Pop = %v, %v; want %v", c, err, tc.want)
			}
			t.Logf("error: %v", err)
			if ch := m.deviceWrites(); len(ch) != 0 {
				t.Fatalf("refused chain wrote guest memory at %#x", ch[0])
			}
		})
	}
}

func TestStartChecksRings(t *testing.T) {
	cases := []struct {
		name  string
		size  uint16
		addrs RingAddrs
		want  error
	}{
		{"size 0", 0, RingAddrs{descGPA, availGPA, usedGPA}, ErrQueueSize},
		{"size not a power of two", 6, RingAddrs{descGPA, availGPA, usedGPA}, ErrQueueSize},
		{"size above the maximum", 16, RingAddrs{descGPA, availGPA, usedGPA}, ErrQueueSize},
		{"descriptor table misaligned", 8, RingAddrs{descGPA + 8, availGPA, usedGPA}, ErrRingAlign},
		{"available ring misaligned", 8, RingAddrs{descGPA, availGPA + 1, usedGPA}, ErrRingAlign},
		{"used ring misaligned", 8, RingAddrs{descGPA, availGPA, usedGPA + 2}, ErrRingAlign},
		{"descriptor table outside RAM", 8, RingAddrs{0, availGPA, usedGPA}, ErrRingNotRAM},
		{"available ring across the end of RAM", 8, RingAddrs{descGPA, testBase + testSize - 16, usedGPA}, ErrRingNotRAM},
		{"used ring wraps", 8, RingAddrs{descGPA, availGPA, 0xffff_ffff_ffff_fff0}, ErrRingNotRAM},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newFakeMem(testBase, testSize)
			q, _ := NewQueue(0, 8, m, m.Dirty)
			if err := q.Start(tc.size, tc.addrs, testFeatures); !errors.Is(err, tc.want) {
				t.Fatalf("Start = %v, want %v", err, tc.want)
			}
			if q.Ready() {
				t.Fatal("queue ready after a refused Start")
			}
		})
	}
	// An available ring at 2 mod 4 is fine: avail.idx is then 4-aligned.
	m := newFakeMem(testBase, testSize)
	q, _ := NewQueue(0, 8, m, m.Dirty)
	if err := q.Start(8, RingAddrs{descGPA, availGPA + 2, usedGPA}, testFeatures); err != nil {
		t.Fatal(err)
	}
	m.put16(availGPA+2+4, 0) // ring[0] = head 0
	m.put16(availGPA+2+2, 1) // avail.idx
	if c, err := q.Pop(); err != nil || c == nil {
		t.Fatalf("Pop with the available ring at 2 mod 4 = %v, %v", c, err)
	}
}

// TestNoInterruptBeforePush: a queue that has used nothing owes the
// driver nothing, whatever used_event and avail.flags say (the transport
// runs Process, which asks NeedsInterrupt, at every DRIVER_OK and Resume).
func TestNoInterruptBeforePush(t *testing.T) {
	for _, f := range []uint64{testFeatures, testFeatures | FeatureEventIdx} {
		_, r, q := startedQueue(t, 8, f)
		if c, err := q.Pop(); c != nil || err != nil {
			t.Fatalf("Pop = %v, %v", c, err)
		}
		if q.NeedsInterrupt() {
			t.Fatalf("features %#x: an interrupt before anything was used", f)
		}
		r.setDesc(0, bufGPA, 16, descFWrite, 0)
		r.publish(0)
		c, err := q.Pop()
		if err != nil || c == nil {
			t.Fatalf("Pop = %v, %v", c, err)
		}
		if err := q.Push(c.Head, 0); err != nil {
			t.Fatal(err)
		}
		if !q.NeedsInterrupt() {
			t.Fatalf("features %#x: no interrupt for the first used buffer", f)
		}
	}
}
