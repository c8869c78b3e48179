package pci

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ferry-vmm/ferry/internal/devices"
)

func TestHostBridge(t *testing.T) {
	tb := newTestBus(t)
	if got := tb.conf1Read(0, RegVendorID, 4); got != HostBridgeDeviceID<<16|HostBridgeVendorID {
		t.Errorf("slot 0 IDs = %#x", got)
	}
	if got := tb.conf1Read(0, RegRevision, 4) >> 8; got != HostBridgeClass {
		t.Errorf("slot 0 class = %#x", got)
	}
	want := []SlotInfo{{Slot: 0, Name: HostBridgeName, VendorID: HostBridgeVendorID,
		DeviceID: HostBridgeDeviceID, ClassCode: HostBridgeClass}}
	if got := tb.Slots(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Slots() = %+v, want %+v", got, want)
	}
}

func TestNewBusErrors(t *testing.T) {
	good := DefaultLayout()
	for name, l := range map[string]Layout{
		"empty memory window": {ECAMBase: good.ECAMBase, MemBase: 0xc000_0000, MemEnd: 0xc000_0000, IOBase: good.IOBase, IOEnd: good.IOEnd},
		"memory above 4 GiB":  {ECAMBase: good.ECAMBase, MemBase: 0xc000_0000, MemEnd: 1<<32 + 1, IOBase: good.IOBase, IOEnd: good.IOEnd},
		"ports past 64 KiB":   {ECAMBase: good.ECAMBase, MemBase: good.MemBase, MemEnd: good.MemEnd, IOBase: 0xc000, IOEnd: 0x10001},
		"misaligned ECAM":     {ECAMBase: good.ECAMBase + 0x1000, MemBase: good.MemBase, MemEnd: good.MemEnd, IOBase: good.IOBase, IOEnd: good.IOEnd},
		"ECAM in the window":  {ECAMBase: 0xd000_0000, MemBase: good.MemBase, MemEnd: good.MemEnd, IOBase: good.IOBase, IOEnd: good.IOEnd},
		"ECAM wraps":          {ECAMBase: ^uint64(0) &^ (ECAMSize - 1), MemBase: good.MemBase, MemEnd: good.MemEnd, IOBase: good.IOBase, IOEnd: good.IOEnd},
	} {
		var mmio, pio devices.Bus
		if _, err := NewBus(l, &mmio, &pio, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	var mmio, pio devices.Bus
	if _, err := NewBus(good, nil, &pio, nil); err == nil {
		t.Error("nil MMIO bus accepted")
	}
	must(t, pio.Register("reset", 0xcf9, 1, barDevice{fn: newTestFunc(t, &fakeSender{})}))
	if _, err := NewBus(good, &mmio, &pio, nil); err == nil || !strings.Contains(err.Error(), "overlaps") {
		t.Errorf("conf1 over a taken port: %v", err)
	}
}

func TestConf1Accesses(t *testing.T) {
	tb := newTestBus(t)
	f := newTestFunc(t, &fakeSender{})
	slot, err := tb.Add("net0", f)
	must(t, err)
	full := tb.conf1Read(slot, RegVendorID, 4)
	if full != 0x1041_1af4 {
		t.Fatalf("dword 0 = %#x", full)
	}
	for reg := range 4 {
		if got := tb.conf1Read(slot, reg, 1); got != full>>(8*reg)&0xff {
			t.Errorf("byte %d = %#x", reg, got)
		}
	}
	for reg := 0; reg < 4; reg += 2 {
		if got := tb.conf1Read(slot, reg, 2); got != full>>(8*reg)&0xffff {
			t.Errorf("word %d = %#x", reg, got)
		}
	}
	// Byte and word writes land at the right place.
	tb.conf1Write(slot, RegInterruptLine, 1, 0x0b)
	tb.conf1Write(slot, RegCommand, 2, CommandBusMaster)
	if got := f.cfg.Command(); got != CommandBusMaster {
		t.Errorf("command after a word write = %#x", got)
	}
	if got := tb.conf1Read(slot, RegInterruptLine, 4); got&0xff != 0x0b {
		t.Errorf("interrupt line = %#x", got)
	}

	allOnes := map[string]func() uint32{
		"misaligned word":  func() uint32 { return tb.readData(conf1Addr(slot, 0), 1, 2) },
		"dword at 0xCFE":   func() uint32 { return tb.readData(conf1Addr(slot, 0), 2, 4) },
		"enable bit clear": func() uint32 { return tb.readData(conf1Addr(slot, 0)&^(1<<31), 0, 4) },
		"bus 1":            func() uint32 { return tb.readData(conf1Addr(slot, 0)|1<<16, 0, 4) },
		"function 1":       func() uint32 { return tb.readData(conf1Addr(slot, 0)|1<<8, 0, 4) },
		"empty slot":       func() uint32 { return tb.conf1Read(slot+1, 0, 4) },
		"slot 31":          func() uint32 { return tb.conf1Read(31, 0, 4) },
	}
	for name, read := range allOnes {
		if got := read(); got != 0xffffffff && got != 0xffff {
			t.Errorf("%s reads %#x, want all ones", name, got)
		}
	}
	// Writes to absent functions are dropped (and do not reach slot 1).
	before := f.cfg.Bytes(0, ConfigSize)
	for _, addr := range []uint32{conf1Addr(slot, RegCommand) | 1<<8, conf1Addr(slot, RegCommand) | 1<<16, conf1Addr(slot, RegCommand) &^ (1 << 31)} {
		tb.pio.Write(Conf1AddressPort, le32(addr))
		tb.pio.Write(Conf1DataPort, le32(0xffff))
	}
	if !slices.Equal(before, f.cfg.Bytes(0, ConfigSize)) {
		t.Error("a write to an absent function changed slot 1")
	}
}

// readData sets the address register, then reads n bytes at data port
// offset off.
func (tb *testBus) readData(addr uint32, off uint64, n int) uint32 {
	tb.pio.Write(Conf1AddressPort, le32(addr))
	data := make([]byte, n)
	tb.pio.Read(Conf1DataPort+off, data)
	return leUint(data)
}

func TestConf1AddressRegister(t *testing.T) {
	tb := newTestBus(t)
	tb.pio.Write(Conf1AddressPort, le32(0xffffffff))
	data := make([]byte, 4)
	tb.pio.Read(Conf1AddressPort, data)
	if got := leUint(data); got != conf1Writable {
		t.Errorf("address register = %#x, want %#x", got, conf1Writable)
	}
	// Linux's pci_check_type1: a byte write to 0xCFB must not disturb it.
	tb.pio.Write(Conf1AddressPort, le32(0x8000_0000))
	tb.pio.Write(Conf1AddressPort+3, []byte{1})
	tb.pio.Read(Conf1AddressPort, data)
	if got := leUint(data); got != 0x8000_0000 {
		t.Errorf("after a byte write to 0xCFB: %#x", got)
	}
	b := []byte{0}
	tb.pio.Read(Conf1AddressPort+1, b)
	if b[0] != 0xff {
		t.Errorf("byte read of 0xCF9 = %#x, want 0xff", b[0])
	}
}

func TestECAMEqualsConf1(t *testing.T) {
	tb := newTestBus(t)
	_, err := tb.Add("net0", newTestFunc(t, &fakeSender{}))
	must(t, err)
	for dev := range NumSlots {
		for reg := 0; reg < LegacyConfigSize; reg++ {
			for _, n := range []int{1, 2, 4} {
				if reg%n != 0 {
					continue
				}
				if c, e := tb.conf1Read(dev, reg, n), tb.ecamRead(dev, reg, n); c != e {
					t.Fatalf("device %d reg %#x/%d: conf1 %#x, ECAM %#x", dev, reg, n, c, e)
				}
			}
		}
	}
	tb.ecamWrite(1, RegCommand, 2, CommandMemory)
	if got := tb.conf1Read(1, RegCommand, 2); got != CommandMemory {
		t.Errorf("ECAM write seen through conf1 as %#x", got)
	}
	if got := tb.ecamRead(1, 0x100, 4); got != 0 {
		t.Errorf("extended space through ECAM = %#x, want 0", got)
	}
	for name, off := range map[string]uint64{
		"function 1": 1<<15 | 1<<12, "misaligned": 1<<15 | 1, "empty slot": 5 << 15,
	} {
		data := make([]byte, 4)
		tb.mmio.Read(DefaultLayout().ECAMBase+off, data)
		if leUint(data) != 0xffffffff {
			t.Errorf("ECAM %s reads % x", name, data)
		}
	}
	// An 8-byte access is not a configuration access.
	data := make([]byte, 8)
	tb.mmio.Read(DefaultLayout().ECAMBase+1<<15, data)
	if !slices.Equal(data, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) {
		t.Errorf("8-byte ECAM read = % x", data)
	}
}

func TestAddPlacement(t *testing.T) {
	tb := newTestBus(t)
	l := DefaultLayout()
	var used []span
	for i := 1; i < NumSlots; i++ {
		slot, err := tb.Add(fmt.Sprintf("f%d", i), newTestFunc(t, &fakeSender{}))
		if err != nil {
			t.Fatalf("Add #%d: %v", i, err)
		}
		if slot != i {
			t.Errorf("Add #%d got slot %d", i, slot)
		}
	}
	for _, s := range tb.Slots()[1:] {
		for _, b := range s.BARs {
			lo, hi := l.MemBase, l.MemEnd
			if b.Kind == BARIO {
				lo, hi = l.IOBase, l.IOEnd
			}
			if b.Address%b.Size != 0 || b.Address < lo || b.Address+b.Size > hi {
				t.Errorf("slot %d BAR %d at %#x size %#x: misaligned or outside [%#x,%#x)", s.Slot, b.Index, b.Address, b.Size, lo, hi)
			}
			if b.Mapped {
				t.Errorf("slot %d BAR %d mapped with decoding off", s.Slot, b.Index)
			}
			sp := span{b.Address, b.Address + b.Size}
			for _, u := range used {
				if sp.start < u.end && u.start < sp.end {
					t.Errorf("slot %d BAR %d [%#x,%#x) overlaps [%#x,%#x)", s.Slot, b.Index, sp.start, sp.end, u.start, u.end)
				}
			}
			used = append(used, sp)
		}
	}
	if s := tb.Slots()[1]; s.BARs[0].Address != 0xc000_0000 || s.BARs[1].Address != 0xc000 || s.BARs[2].Address != 0xc000_4000 {
		t.Errorf("first function placed at %+v", s.BARs)
	}
	if _, err := tb.Add("one more", newTestFunc(t, &fakeSender{})); err == nil {
		t.Error("a 32nd slot was handed out")
	}
}

func TestAddErrors(t *testing.T) {
	tb := newTestBus(t)
	f := newTestFunc(t, &fakeSender{})
	_, err := tb.Add("net0", f)
	must(t, err)
	if _, err := tb.Add("net0", newTestFunc(t, &fakeSender{})); err == nil {
		t.Error("duplicate name accepted")
	}
	if _, err := tb.Add("net1", f); err == nil {
		t.Error("the same function added twice")
	}
	if _, err := tb.Add("", newTestFunc(t, &fakeSender{})); err == nil {
		t.Error("empty name accepted")
	}
	if _, err := tb.Add("nil", nil); err == nil {
		t.Error("nil function accepted")
	}
	big := &testFunc{cfg: NewConfigSpace(testHeader)}
	must(t, big.cfg.DefineBAR(0, 1<<30, BARMem32, false))
	if _, err := tb.Add("big", big); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Errorf("a BAR larger than the window: %v", err)
	}
	if n := len(tb.Slots()); n != 2 {
		t.Errorf("%d slots after failed adds, want 2", n)
	}
}

func barAccess(tb *testBus, io bool, addr uint64, write bool) {
	bus := &tb.mmio
	if io {
		bus = &tb.pio
	}
	data := make([]byte, 4)
	if write {
		bus.Write(addr, data)
	} else {
		bus.Read(addr, data)
	}
}

func TestBARMapping(t *testing.T) {
	tb := newTestBus(t)
	f := newTestFunc(t, &fakeSender{})
	slot, err := tb.Add("net0", f)
	must(t, err)
	bar3 := f.cfg.BARAddress(3)
	io := f.cfg.BARAddress(2)

	barAccess(tb, false, bar3+8, false)
	if got := f.take(); len(got) != 0 {
		t.Fatalf("BAR reached with decoding off: %v", got)
	}
	tb.conf1Write(slot, RegCommand, 2, CommandMemory|CommandIO)
	barAccess(tb, false, bar3+8, false)
	barAccess(tb, true, io+4, true)
	if got := f.take(); !slices.Equal(got, []string{"r BAR3 0x8/4", "w BAR2 0x4/4"}) {
		t.Errorf("accesses after enabling decode: %v", got)
	}
	// MSI-X table through the 64-bit BAR.
	data := make([]byte, 4)
	tb.mmio.Read(f.cfg.BARAddress(0)+testTableOff+12, data)
	if leUint(data) != 1 {
		t.Errorf("MSI-X vector 0 control through the bus = % x", data)
	}

	// The guest moves BAR 3 (decode on, as some guests do).
	const moved = 0xd000_0000
	tb.conf1Write(slot, RegBAR0+12, 4, moved)
	barAccess(tb, false, bar3+8, false)
	if got := f.take(); len(got) != 0 {
		t.Errorf("old address still mapped: %v", got)
	}
	barAccess(tb, false, moved+0xffc, true)
	if got := f.take(); !slices.Equal(got, []string{"w BAR3 0xffc/4"}) {
		t.Errorf("access at the new address: %v", got)
	}
	// Sizing with decode on unmaps it until the address comes back.
	tb.conf1Write(slot, RegBAR0+12, 4, 0xffffffff)
	barAccess(tb, false, 0xffff_f000, false)
	barAccess(tb, false, moved, false)
	if got := f.take(); len(got) != 0 {
		t.Errorf("BAR reached while being sized: %v", got)
	}
	tb.conf1Write(slot, RegBAR0+12, 4, moved)
	// A 64-bit BAR moved above 4 GiB, high half first.
	tb.conf1Write(slot, RegBAR0+4, 4, 0x1)
	tb.conf1Write(slot, RegBAR0, 4, 0x8000_0000)
	tb.mmio.Write(0x1_8000_0000+0x10, le32(0)) // an access below the MSI-X table
	// Clearing memory decode unmaps the memory BARs only.
	tb.conf1Write(slot, RegCommand, 2, CommandIO)
	barAccess(tb, false, moved, false)
	barAccess(tb, true, io, false)
	if got := f.take(); !slices.Equal(got, []string{"w BAR0 0x10/4", "r BAR2 0x0/4"}) {
		t.Errorf("accesses: %v", got)
	}
	info := tb.Slots()[1].BARs
	if info[0].Mapped || !info[1].Mapped || info[2].Mapped || info[0].Address != 0x1_8000_0000 {
		t.Errorf("Slots() BARs = %+v", info)
	}
}

func TestBAROverlapRefused(t *testing.T) {
	tb := newTestBus(t)
	f1, f2 := newTestFunc(t, &fakeSender{}), newTestFunc(t, &fakeSender{})
	s1, err := tb.Add("a", f1)
	must(t, err)
	s2, err := tb.Add("b", f2)
	must(t, err)
	tb.conf1Write(s1, RegCommand, 2, CommandMemory|CommandIO)
	tb.conf1Write(s2, RegCommand, 2, CommandMemory|CommandIO)
	target := f1.cfg.BARAddress(3)

	for range 3 { // the guest insists: logged once
		tb.conf1Write(s2, RegBAR0+12, 4, uint32(target))
	}
	if n := strings.Count(tb.logBuf.String(), "BAR left unmapped"); n != 1 {
		t.Errorf("%d log lines for the overlap, want 1:\n%s", n, tb.logBuf.String())
	}
	barAccess(tb, false, target, false)
	if got1, got2 := f1.take(), f2.take(); len(got1) != 1 || len(got2) != 0 {
		t.Errorf("overlapping address reached a=%v b=%v, want a only", got1, got2)
	}
	// Onto ECAM and onto the conf1 ports: refused, the bus keeps working.
	tb.conf1Write(s2, RegBAR0+12, 4, uint32(DefaultLayout().ECAMBase))
	tb.conf1Write(s2, RegBAR0+8, 4, Conf1AddressPort&^0x1f)
	if got := tb.conf1Read(s2, RegVendorID, 2); got != uint32(testHeader.VendorID) {
		t.Errorf("configuration access after hostile BARs = %#x", got)
	}
	if !strings.Contains(tb.logBuf.String(), "pci-ecam") || !strings.Contains(tb.logBuf.String(), "pci-conf1") {
		t.Errorf("log does not name the conflicts:\n%s", tb.logBuf.String())
	}
	// When slot 1 moves away, slot 2's BAR gets the address.
	tb.conf1Write(s2, RegBAR0+12, 4, uint32(target))
	tb.conf1Write(s1, RegBAR0+12, 4, 0xd100_0000)
	barAccess(tb, false, target, false)
	barAccess(tb, false, 0xd100_0000, false)
	if got1, got2 := f1.take(), f2.take(); len(got1) != 1 || len(got2) != 1 {
		t.Errorf("after the move a=%v b=%v, want one access each", got1, got2)
	}
}

func TestBusStateRoundTrip(t *testing.T) {
	build := func() (*testBus, *testFunc, *testFunc) {
		tb := newTestBus(t)
		a, b := newTestFunc(t, &fakeSender{}), newTestFunc(t, &fakeSender{})
		_, err := tb.Add("a", a)
		must(t, err)
		_, err = tb.Add("b", b)
		must(t, err)
		return tb, a, b
	}
	src, _, _ := build()
	src.conf1Write(2, RegBAR0+12, 4, 0xd200_0000)
	src.conf1Write(2, RegCommand, 2, CommandMemory)
	src.pio.Write(Conf1AddressPort, le32(conf1Addr(1, RegCommand)))
	st := src.State()
	if len(st.Slots) != 3 || st.Slots[0].Name != HostBridgeName {
		t.Fatalf("State() = %d slots", len(st.Slots))
	}

	dst, _, db := build()
	dst.conf1Write(1, RegCommand, 2, CommandMemory) // differs from src: must be unmapped by SetState
	must(t, dst.SetState(st))
	if got, want := fmt.Sprint(dst.Slots()), fmt.Sprint(src.Slots()); got != want {
		t.Errorf("Slots after restore:\n%s\nwant\n%s", got, want)
	}
	barAccess(dst, false, 0xd200_0000, false)
	if got := db.take(); len(got) != 1 {
		t.Errorf("moved BAR after restore: %v", got)
	}
	data := make([]byte, 2)
	dst.pio.Read(Conf1DataPort, data) // the saved address register
	if leUint(data) != 0 {
		t.Errorf("command of slot 1 after restore = %#x", leUint(data))
	}
}

func TestBusSetStateGarbage(t *testing.T) {
	tb := newTestBus(t)
	f := newTestFunc(t, &fakeSender{})
	_, err := tb.Add("a", f)
	must(t, err)
	good := tb.State()
	with := func(edit func(s *BusState)) BusState {
		s := BusState{Conf1Address: good.Conf1Address}
		for _, ss := range good.Slots {
			ss.Config.Data = slices.Clone(ss.Config.Data)
			s.Slots = append(s.Slots, ss)
		}
		edit(&s)
		return s
	}
	for name, st := range map[string]BusState{
		"empty":         {},
		"missing slot":  with(func(s *BusState) { s.Slots = s.Slots[:1] }),
		"extra slot":    with(func(s *BusState) { s.Slots = append(s.Slots, SlotState{Slot: 5, Name: "x"}) }),
		"renamed":       with(func(s *BusState) { s.Slots[1].Name = "z" }),
		"moved":         with(func(s *BusState) { s.Slots[1].Slot = 2 }),
		"negative slot": with(func(s *BusState) { s.Slots[1].Slot = -1 }),
		"huge slot":     with(func(s *BusState) { s.Slots[1].Slot = 1 << 40 }),
		"twice":         with(func(s *BusState) { s.Slots[0] = s.Slots[1] }),
		"short config":  with(func(s *BusState) { s.Slots[1].Config.Data = s.Slots[1].Config.Data[:10] }),
		"nil config":    with(func(s *BusState) { s.Slots[0].Config.Data = nil }),
		"wrong device":  with(func(s *BusState) { s.Slots[1].Config.Data[RegDeviceID] ^= 1 }),
		"bridge class":  with(func(s *BusState) { s.Slots[0].Config.Data[RegClassCode+2] = 2 }),
	} {
		if err := tb.SetState(st); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// Only the last slot bad: the first must not have been applied.
	bad := with(func(s *BusState) {
		s.Slots[0].Config.Data[RegCommand] = CommandMemory
		s.Slots[1].Config.Data[RegVendorID] = 0
	})
	if err := tb.SetState(bad); err == nil {
		t.Error("partially bad state accepted")
	}
	if got := tb.conf1Read(0, RegCommand, 2); got != 0 {
		t.Errorf("host bridge command = %#x after a refused SetState", got)
	}
	must(t, tb.SetState(good))
}

// vCPUs access BARs and configuration space while another moves BARs
// (run with -race).
func TestBusConcurrent(t *testing.T) {
	tb := newTestBus(t)
	f := newTestFunc(t, &fakeSender{})
	slot, err := tb.Add("a", f)
	must(t, err)
	tb.Bus.log = slog.New(slog.DiscardHandler)
	var wg sync.WaitGroup
	wg.Add(3)
	for range 2 {
		go func() {
			defer wg.Done()
			for i := range 300 {
				barAccess(tb, false, 0xd000_0000+uint64(i%4)*4, i%2 == 0)
				tb.ecamRead(slot, RegVendorID, 4)
				_ = tb.Slots()
			}
		}()
	}
	go func() {
		defer wg.Done()
		for i := range 300 {
			tb.ecamWrite(slot, RegBAR0+12, 4, 0xd000_0000+uint32(i%2)*0x1000)
			tb.ecamWrite(slot, RegCommand, 2, uint32(i%3)*CommandMemory)
			_ = tb.State()
		}
	}()
	wg.Wait()
	f.take()
}

func TestDevicesBusUnregister(t *testing.T) {
	var b devices.Bus
	f := newTestFunc(t, &fakeSender{})
	must(t, b.Register("x", 0x1000, 0x100, barDevice{fn: f, bar: 3}))
	must(t, b.Register("y", 0x2000, 0x100, barDevice{fn: f, bar: 4}))
	if err := b.Unregister(0x1004); err == nil {
		t.Error("Unregister inside a range succeeded")
	}
	if err := b.Unregister(0x3000); err == nil {
		t.Error("Unregister of nothing succeeded")
	}
	must(t, b.Unregister(0x1000))
	if err := b.Unregister(0x1000); err == nil {
		t.Error("Unregister twice succeeded")
	}
	before := b.UnclaimedAccesses()
	b.Read(0x1000, make([]byte, 4))
	b.Read(0x2000, make([]byte, 4))
	if b.UnclaimedAccesses() != before+1 {
		t.Error("unregistered range still claimed, or the other one lost")
	}
	if got := f.take(); !slices.Equal(got, []string{"r BAR4 0x0/4"}) {
		t.Errorf("accesses: %v", got)
	}
	must(t, b.Register("x again", 0x1000, 0x100, barDevice{fn: f, bar: 3}))
}
