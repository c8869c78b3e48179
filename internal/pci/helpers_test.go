package pci

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"testing"

	"github.com/ferry-vmm/ferry/internal/devices"
)

var testHeader = Header{
	VendorID: 0x1af4, DeviceID: 0x1041, SubsystemVendorID: 0x1af4, SubsystemID: 0x0001,
	ClassCode: 0x020000, Revision: 1,
}

// fakeSender records MSI messages.
type fakeSender struct {
	mu   sync.Mutex
	msgs []string
	err  error
}

func (s *fakeSender) SignalMSI(addr uint64, data uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, fmt.Sprintf("%#x:%#x", addr, data))
	return s.err
}

func (s *fakeSender) take() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.msgs
	s.msgs = nil
	return m
}

// testFunc is a function with a 64-bit prefetchable memory BAR 0 (16 KiB,
// MSI-X table at 0x1000, PBA at 0x3000), an I/O BAR 2 (32 ports) and a
// 32-bit memory BAR 3 (4 KiB). BAR accesses outside MSI-X are logged.
type testFunc struct {
	cfg  *ConfigSpace
	msix *MSIX

	mu  sync.Mutex
	log []string
}

const (
	testTableOff = 0x1000
	testPBAOff   = 0x3000
	testVectors  = 4
)

func newTestFunc(t testing.TB, s MSISender) *testFunc {
	t.Helper()
	f := &testFunc{cfg: NewConfigSpace(testHeader)}
	for _, d := range []struct {
		i    int
		size uint64
		kind BARKind
		pf   bool
	}{{0, 0x4000, BARMem64, true}, {2, 32, BARIO, false}, {3, 0x1000, BARMem32, false}} {
		if err := f.cfg.DefineBAR(d.i, d.size, d.kind, d.pf); err != nil {
			t.Fatal(err)
		}
	}
	m, err := NewMSIX(f.cfg, testVectors, 0, testTableOff, testPBAOff, s)
	if err != nil {
		t.Fatal(err)
	}
	m.SetLogger(slog.New(slog.DiscardHandler))
	f.msix = m
	return f
}

func (f *testFunc) Config() *ConfigSpace { return f.cfg }

func (f *testFunc) BARRead(bar int, offset uint64, data []byte) {
	if bar == 0 && f.msix.Read(offset, data) {
		return
	}
	f.record("r", bar, offset, data)
	fill(data, byte(0x10+bar))
}

func (f *testFunc) BARWrite(bar int, offset uint64, data []byte) {
	if bar == 0 && f.msix.Write(offset, data) {
		return
	}
	f.record("w", bar, offset, data)
}

func (f *testFunc) record(op string, bar int, offset uint64, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, fmt.Sprintf("%s BAR%d %#x/%d", op, bar, offset, len(data)))
}

func (f *testFunc) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.log
	f.log = nil
	return l
}

// testBus is a Bus on fresh MMIO and port buses, with log output captured.
type testBus struct {
	*Bus
	mmio, pio devices.Bus
	logBuf    syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newTestBus(t testing.TB) *testBus {
	t.Helper()
	tb := &testBus{}
	b, err := NewBus(DefaultLayout(), &tb.mmio, &tb.pio, slog.New(slog.NewTextHandler(&tb.logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	tb.Bus = b
	return tb
}

func conf1Addr(dev, reg int) uint32 { return 1<<31 | uint32(dev)<<11 | uint32(reg)&0xfc }

func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

// conf1Read reads n bytes of register reg of device dev through ports
// 0xCF8/0xCFC, as Linux's pci_conf1_read does.
func (tb *testBus) conf1Read(dev, reg, n int) uint32 {
	tb.pio.Write(Conf1AddressPort, le32(conf1Addr(dev, reg)))
	data := make([]byte, n)
	tb.pio.Read(Conf1DataPort+uint64(reg&3), data)
	return leUint(data)
}

func (tb *testBus) conf1Write(dev, reg, n int, v uint32) {
	tb.pio.Write(Conf1AddressPort, le32(conf1Addr(dev, reg)))
	tb.pio.Write(Conf1DataPort+uint64(reg&3), le32(v)[:n])
}

func ecamOffset(dev, reg int) uint64 { return uint64(dev)<<15 | uint64(reg) }

func (tb *testBus) ecamRead(dev, reg, n int) uint32 {
	data := make([]byte, n)
	tb.mmio.Read(DefaultLayout().ECAMBase+ecamOffset(dev, reg), data)
	return leUint(data)
}

func (tb *testBus) ecamWrite(dev, reg, n int, v uint32) {
	tb.mmio.Write(DefaultLayout().ECAMBase+ecamOffset(dev, reg), le32(v)[:n])
}

func leUint(b []byte) uint32 {
	var v uint32
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint32(b[i])
	}
	return v
}

// cfgRead reads n bytes of c at off.
func cfgRead(c *ConfigSpace, off, n int) uint32 {
	data := make([]byte, n)
	c.Read(off, data)
	return leUint(data)
}

func cfgWrite(c *ConfigSpace, off, n int, v uint32) { c.Write(off, le32(v)[:n]) }
