package pci

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// msixEntry programs vector v through 4-byte table writes, as Linux does.
func msixEntry(m *MSIX, v int, addr uint64, data uint32, masked bool) {
	base := uint64(testTableOff + v*16)
	m.Write(base, le32(uint32(addr)))
	m.Write(base+4, le32(uint32(addr>>32)))
	m.Write(base+8, le32(data))
	ctl := uint32(0)
	if masked {
		ctl = 1
	}
	m.Write(base+12, le32(ctl))
}

func msixRead(m *MSIX, off uint64, n int) uint64 {
	data := make([]byte, n)
	if !m.Read(off, data) {
		return 0xdead
	}
	var v uint64
	for i := n - 1; i >= 0; i-- {
		v = v<<8 | uint64(data[i])
	}
	return v
}

func setControl(f *testFunc, v uint16) { cfgWrite(f.cfg, f.msix.CapOffset()+2, 2, uint32(v)) }

// busMaster sets or clears Bus Master Enable, as pci_set_master and
// pci_clear_master do (read, modify, write).
func busMaster(f *testFunc, on bool) {
	cmd := cfgRead(f.cfg, RegCommand, 2) &^ CommandBusMaster
	if on {
		cmd |= CommandBusMaster
	}
	cfgWrite(f.cfg, RegCommand, 2, cmd)
}

func TestMSIXCapability(t *testing.T) {
	f := newTestFunc(t, &fakeSender{})
	off := f.msix.CapOffset()
	ids, offs := walkCaps(func(o, n int) uint32 { return cfgRead(f.cfg, o, n) })
	if !bytes.Equal(ids, []byte{CapMSIX}) || offs[0] != off {
		t.Fatalf("capability list %x at %#x, want MSI-X at %#x", ids, offs, off)
	}
	if got := cfgRead(f.cfg, off+2, 2); got != testVectors-1 {
		t.Errorf("message control = %#x, want %#x", got, testVectors-1)
	}
	const bir = 0 // the table and the PBA are in BAR 0
	if got := cfgRead(f.cfg, off+4, 4); got != testTableOff+bir {
		t.Errorf("table offset/BIR = %#x", got)
	}
	if got := cfgRead(f.cfg, off+8, 4); got != testPBAOff+bir {
		t.Errorf("PBA offset/BIR = %#x", got)
	}
	cfgWrite(f.cfg, off, 4, 0xffffffff)
	cfgWrite(f.cfg, off+4, 4, 0)
	cfgWrite(f.cfg, off+8, 4, 0)
	if got := cfgRead(f.cfg, off, 4); got != (0xc000|testVectors-1)<<16|CapMSIX {
		t.Errorf("after writing ones: id/next/control = %#x", got)
	}
	if got := cfgRead(f.cfg, off+4, 4); got != testTableOff {
		t.Errorf("table offset was writable: %#x", got)
	}
	if !f.msix.Enabled() {
		t.Error("not enabled after setting bit 15")
	}
}

func TestMSIXTableWrites(t *testing.T) {
	f := newTestFunc(t, &fakeSender{})
	m := f.msix
	for v := range testVectors {
		if got := msixRead(m, uint64(testTableOff+v*16+12), 4); got != 1 {
			t.Errorf("vector %d control = %#x, want masked", v, got)
		}
	}
	msixEntry(m, 2, 0xfee0_1000, 0x4041, false)
	if got := msixRead(m, testTableOff+2*16, 8); got != 0xfee0_1000 {
		t.Errorf("address (8-byte read) = %#x", got)
	}
	if got := msixRead(m, testTableOff+2*16+8, 4); got != 0x4041 {
		t.Errorf("data = %#x", got)
	}
	// 8-byte write of data and vector control; reserved control bits stay 0.
	m.Write(testTableOff+2*16+8, binary.LittleEndian.AppendUint64(nil, 0xffff_ffff_0000_0042))
	if got := msixRead(m, testTableOff+2*16+8, 8); got != 0x1_0000_0042 {
		t.Errorf("data/control after an 8-byte write = %#x", got)
	}
	// The PBA is read-only.
	if !m.Write(testPBAOff, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) {
		t.Error("PBA write not handled")
	}
	if got := msixRead(m, testPBAOff, 8); got != 0 {
		t.Errorf("PBA after a write = %#x", got)
	}
	// Outside both structures.
	for _, off := range []uint64{0, testTableOff - 1, testTableOff + testVectors*16, testPBAOff + 8, 1 << 63, ^uint64(0)} {
		if m.Read(off, make([]byte, 4)) || m.Write(off, make([]byte, 4)) {
			t.Errorf("offset %#x claimed", off)
		}
	}
	// An access running off the end of the table is clipped.
	last := uint64(testTableOff + testVectors*16 - 4)
	if got := msixRead(m, last, 8); got != 1 {
		t.Errorf("read past the table end = %#x, want 1 (then zeros)", got)
	}
	m.Write(last, bytes.Repeat([]byte{0xff}, 64))
	if got := msixRead(m, last, 4); got != 1 {
		t.Errorf("vector control after a long write = %#x", got)
	}
}

func TestMSIXMaskPendingUnmask(t *testing.T) {
	s := &fakeSender{}
	f := newTestFunc(t, s)
	m := f.msix
	msixEntry(m, 1, 0xfee0_0000, 0x31, true)
	busMaster(f, true)
	setControl(f, MSIXControlEnable)

	must(t, m.Notify(1))
	if got := s.take(); len(got) != 0 {
		t.Errorf("masked vector delivered %v", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 1<<1 {
		t.Errorf("PBA = %#x, want bit 1", got)
	}
	must(t, m.Notify(1)) // still one pending message
	m.Write(testTableOff+16+12, le32(0))
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x31"}) {
		t.Errorf("unmask delivered %v", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0 {
		t.Errorf("PBA after delivery = %#x", got)
	}
	must(t, m.Notify(1))
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x31"}) {
		t.Errorf("unmasked Notify delivered %v", got)
	}
	// Rewriting an unmasked vector without a pending bit sends nothing.
	m.Write(testTableOff+16+12, le32(0))
	if got := s.take(); len(got) != 0 {
		t.Errorf("spurious delivery %v", got)
	}
}

func TestMSIXFunctionMask(t *testing.T) {
	s := &fakeSender{}
	f := newTestFunc(t, s)
	m := f.msix
	for v := range testVectors {
		msixEntry(m, v, 0xfee0_0000, uint32(0x40+v), false)
	}
	busMaster(f, true)
	setControl(f, MSIXControlEnable|MSIXControlFuncMask)
	must(t, m.Notify(0))
	must(t, m.Notify(3))
	if got := s.take(); len(got) != 0 {
		t.Errorf("function-masked vectors delivered %v", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0b1001 {
		t.Errorf("PBA = %#b", got)
	}
	m.Write(testTableOff+3*16+12, le32(1)) // vector 3 masked on its own as well
	setControl(f, MSIXControlEnable)
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x40"}) {
		t.Errorf("clearing the function mask delivered %v", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0b1000 {
		t.Errorf("PBA = %#b, want vector 3 still pending", got)
	}
	m.Write(testTableOff+3*16+12, le32(0))
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x43"}) {
		t.Errorf("unmasking vector 3 delivered %v", got)
	}
}

func TestMSIXNotifyEdges(t *testing.T) {
	s := &fakeSender{}
	f := newTestFunc(t, s)
	m := f.msix
	msixEntry(m, 0, 0xfee0_0000, 0x50, false)
	busMaster(f, true)
	if err := m.Notify(0); err != nil || len(s.take()) != 0 || msixRead(m, testPBAOff, 8) != 0 {
		t.Errorf("Notify while disabled: err %v, or it delivered or set a pending bit", err)
	}
	if f.msix.Enabled() {
		t.Error("enabled at reset")
	}
	setControl(f, MSIXControlEnable)
	if err := m.Notify(NoVector); err != nil || len(s.take()) != 0 {
		t.Errorf("Notify(NoVector): %v", err)
	}
	if err := m.Notify(testVectors); err == nil {
		t.Error("Notify past the table succeeded")
	}
	s.err = errors.New("boom")
	if err := m.Notify(0); err == nil || !errors.Is(err, s.err) {
		t.Errorf("sender error not returned: %v", err)
	}
}

func TestNewMSIXErrors(t *testing.T) {
	s := &fakeSender{}
	for _, tc := range []struct {
		name       string
		vectors    int
		bar        int
		table, pba uint64
		sender     MSISender
	}{
		{"no vectors", 0, 0, 0, 0x800, s},
		{"too many", 2049, 0, 0, 0x800, s},
		{"nil sender", 1, 0, 0, 0x800, nil},
		{"bad BAR", 1, 6, 0, 0x800, s},
		{"undefined BAR", 1, 4, 0, 0x800, s},
		{"I/O BAR", 1, 2, 0, 8, s},
		{"upper half", 1, 1, 0, 0x800, s},
		{"misaligned table", 1, 0, 4, 0x800, s},
		{"misaligned PBA", 1, 0, 0, 0x804, s},
		{"table past the BAR", 2048, 0, 0x1000, 0, s},
		{"PBA past the BAR", 1, 0, 0, 0x4000, s},
		{"huge offset", 1, 0, 0, ^uint64(0) &^ 7, s},
		{"overlap", 8, 0, 0, 0x40, s},
	} {
		c := NewConfigSpace(testHeader)
		must(t, c.DefineBAR(0, 0x4000, BARMem64, false))
		must(t, c.DefineBAR(2, 16, BARIO, false))
		if _, err := NewMSIX(c, tc.vectors, tc.bar, tc.table, tc.pba, tc.sender); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
		if cfgRead(c, RegCapabilities, 1) != 0 {
			t.Errorf("%s: a capability was added", tc.name)
		}
	}
	c := NewConfigSpace(testHeader)
	must(t, c.DefineBAR(0, 0x10000, BARMem32, false))
	m, err := NewMSIX(c, 2048, 0, 0, 0x8000, s)
	must(t, err)
	if got := cfgRead(c, m.CapOffset()+2, 2); got != 0x7ff {
		t.Errorf("2048 vectors: control = %#x", got)
	}
}

func TestMSIXState(t *testing.T) {
	s := &fakeSender{}
	src := newTestFunc(t, s)
	msixEntry(src.msix, 2, 0xfee0_2000, 0x66, true)
	busMaster(src, true) // restored into dst with its configuration space
	setControl(src, MSIXControlEnable)
	must(t, src.msix.Notify(2))
	st := src.msix.State()

	dst := newTestFunc(t, s)
	must(t, dst.cfg.SetState(src.cfg.State()))
	must(t, dst.msix.SetState(st))
	if !bytes.Equal(dst.msix.State().Table, st.Table) || !bytes.Equal(dst.msix.State().PBA, st.PBA) {
		t.Fatal("restored MSI-X state differs")
	}
	if len(s.take()) != 0 {
		t.Error("SetState delivered something")
	}
	dst.msix.Write(testTableOff+2*16+12, le32(0))
	if got := s.take(); !slices.Equal(got, []string{"0xfee02000:0x66"}) {
		t.Errorf("pending vector after restore delivered %v", got)
	}

	before := dst.msix.State()
	for name, bad := range map[string]MSIXState{
		"empty":         {},
		"short table":   {Table: st.Table[:16], PBA: st.PBA},
		"long PBA":      {Table: st.Table, PBA: make([]byte, 16)},
		"reserved bits": {Table: patch(st.Table, 13, 1), PBA: st.PBA},
		"control bit 1": {Table: patch(st.Table, 12, 2), PBA: st.PBA},
		"PBA past N":    {Table: st.Table, PBA: patch(st.PBA, 0, 0x10)},
	} {
		if err := dst.msix.SetState(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if after := dst.msix.State(); !bytes.Equal(after.Table, before.Table) || !bytes.Equal(after.PBA, before.PBA) {
		t.Error("a refused SetState changed the table or PBA")
	}
}

// Notify from device goroutines while the guest masks and unmasks (run with
// -race): every notification is delivered or left pending, none lost.
func TestMSIXConcurrentNotify(t *testing.T) {
	s := &fakeSender{}
	f := newTestFunc(t, s)
	m := f.msix
	msixEntry(m, 0, 0xfee0_0000, 0x70, false)
	busMaster(f, true)
	setControl(f, MSIXControlEnable)
	const n = 500
	var wg sync.WaitGroup
	wg.Add(3)
	for range 2 {
		go func() {
			defer wg.Done()
			for range n {
				if err := m.Notify(0); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	go func() {
		defer wg.Done()
		for i := range n {
			setControl(f, MSIXControlEnable|uint16(i%2)*MSIXControlFuncMask)
			m.Write(testTableOff+12, le32(uint32(i/2%2)))
		}
	}()
	wg.Wait()
	setControl(f, MSIXControlEnable)
	m.Write(testTableOff+12, le32(0))
	if got := len(s.take()); got == 0 || got > 2*n {
		t.Errorf("%d messages for %d notifications", got, 2*n)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0 {
		t.Errorf("PBA = %#x after unmasking everything", got)
	}
}

// TestMSIXBusMaster: with Bus Master Enable clear a function sends no
// message; what it would have sent is pending, and sent once when the
// guest sets the bit again (masked vectors stay pending).
func TestMSIXBusMaster(t *testing.T) {
	s := &fakeSender{}
	f := newTestFunc(t, s)
	m := f.msix
	msixEntry(m, 0, 0xfee0_0000, 0x80, false)
	msixEntry(m, 1, 0xfee0_0000, 0x81, false)
	msixEntry(m, 2, 0xfee0_0000, 0x82, true)
	setControl(f, MSIXControlEnable)
	must(t, m.Notify(0)) // BME clear since reset
	must(t, m.Notify(0))
	must(t, m.Notify(2))
	if got := s.take(); len(got) != 0 {
		t.Fatalf("sent %v with Bus Master Enable clear", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0b101 {
		t.Fatalf("PBA = %#b, want vectors 0 and 2", got)
	}
	// Unmasking does not send while BME is clear; other command bits
	// written do not send either.
	m.Write(testTableOff+2*16+12, le32(0))
	cfgWrite(f.cfg, RegCommand, 2, CommandMemory)
	if got := s.take(); len(got) != 0 {
		t.Fatalf("sent %v with Bus Master Enable clear", got)
	}
	busMaster(f, true)
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x80", "0xfee00000:0x82"}) {
		t.Fatalf("setting Bus Master Enable sent %v", got)
	}
	if got := msixRead(m, testPBAOff, 8); got != 0 {
		t.Fatalf("PBA = %#b after delivery", got)
	}
	busMaster(f, true) // again: nothing left to send
	must(t, m.Notify(1))
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x81"}) {
		t.Fatalf("Notify with Bus Master Enable set sent %v", got)
	}
	// pci_clear_master: pending again; MSI-X disabled meanwhile drops it.
	busMaster(f, false)
	must(t, m.Notify(1))
	if got := s.take(); len(got) != 0 || msixRead(m, testPBAOff, 8) != 0b10 {
		t.Fatalf("after clearing BME: sent %v, PBA %#b", got, msixRead(m, testPBAOff, 8))
	}
	busMaster(f, true)
	if got := s.take(); !slices.Equal(got, []string{"0xfee00000:0x81"}) {
		t.Fatalf("setting Bus Master Enable again sent %v", got)
	}
}

// blockingSender holds each message until released.
type blockingSender struct {
	entered chan struct{}
	release chan struct{}

	mu   sync.Mutex
	sent int
}

func (s *blockingSender) SignalMSI(uint64, uint32) error {
	s.entered <- struct{}{}
	<-s.release
	s.mu.Lock()
	s.sent++
	s.mu.Unlock()
	return nil
}

// TestMSIXBusMasterClearWaits: a configuration write clearing Bus Master
// Enable returns only after the message being sent has gone.
func TestMSIXBusMasterClearWaits(t *testing.T) {
	s := &blockingSender{entered: make(chan struct{}), release: make(chan struct{})}
	f := newTestFunc(t, s)
	m := f.msix
	msixEntry(m, 0, 0xfee0_0000, 0x90, false)
	setControl(f, MSIXControlEnable)
	busMaster(f, true)
	go func() { _ = m.Notify(0) }()
	<-s.entered
	cleared := make(chan struct{})
	go func() {
		busMaster(f, false)
		close(cleared)
	}()
	select {
	case <-cleared:
		t.Fatal("clearing Bus Master Enable returned while a message was being sent")
	case <-time.After(20 * time.Millisecond):
	}
	close(s.release)
	<-cleared
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sent != 1 {
		t.Fatalf("%d messages sent", s.sent)
	}
}
