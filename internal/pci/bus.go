package pci

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"

	"github.com/ferry-vmm/ferry/internal/devices"
)

// Fixed addresses and sizes of bus 0.
const (
	// Conf1AddressPort and Conf1DataPort are configuration mechanism #1's
	// address register (4 ports) and data window (4 ports).
	Conf1AddressPort = 0xcf8
	Conf1DataPort    = 0xcfc
	// ECAMSize is the ECAM window of bus 0 (32 devices × 8 functions ×
	// 4096 bytes).
	ECAMSize = 1 << 20
	// NumSlots is the number of device numbers on a bus.
	NumSlots = 32

	// The host bridge at slot 0: QEMU's "PCIe host bridge" (gpex) IDs.
	HostBridgeVendorID = 0x1b36
	HostBridgeDeviceID = 0x0008
	HostBridgeClass    = 0x060000
	HostBridgeName     = "host-bridge"

	// conf1Writable are the address register's bits that hold a value:
	// enable (31), bus (23:16), device (15:11), function (10:8),
	// register (7:2). Reserved bits 30:24 and 1:0 read as zero.
	conf1Writable  = 0x80fffffc
	conf1Enable    = 1 << 31
	maxPortAddress = 1 << 16
)

// Layout is where bus 0 lives in the guest's physical address and port
// spaces. The VMM describes the same values to the guest in ACPI (MCFG
// for ECAMBase, the host bridge's _CRS for the windows).
type Layout struct {
	ECAMBase        uint64 // MMIO, 1 MiB for bus 0 (bus 0 only)
	MemBase, MemEnd uint64 // 32-bit MMIO window for BARs [MemBase, MemEnd)
	IOBase, IOEnd   uint64 // port window for I/O BARs [IOBase, IOEnd)
}

// DefaultLayout returns ferry's layout: ECAM at 0xE000_0000, the memory
// window 0xC000_0000..0xE000_0000 and the port window 0xC000..0x10000.
func DefaultLayout() Layout {
	return Layout{
		ECAMBase: 0xe000_0000,
		MemBase:  0xc000_0000, MemEnd: 0xe000_0000,
		IOBase: 0xc000, IOEnd: 0x1_0000,
	}
}

func (l Layout) check() error {
	if l.MemBase >= l.MemEnd || l.MemEnd > 1<<32 {
		return fmt.Errorf("memory window [%#x,%#x) is empty or not below 4 GiB", l.MemBase, l.MemEnd)
	}
	if l.IOBase >= l.IOEnd || l.IOEnd > maxPortAddress {
		return fmt.Errorf("port window [%#x,%#x) is empty or beyond port %#x", l.IOBase, l.IOEnd, maxPortAddress)
	}
	if l.ECAMBase%ECAMSize != 0 || l.ECAMBase+ECAMSize < l.ECAMBase {
		return fmt.Errorf("ECAM base %#x is not 1 MiB aligned or wraps", l.ECAMBase)
	}
	if l.ECAMBase < l.MemEnd && l.MemBase < l.ECAMBase+ECAMSize {
		return fmt.Errorf("ECAM [%#x,%#x) overlaps the memory window [%#x,%#x)",
			l.ECAMBase, l.ECAMBase+ECAMSize, l.MemBase, l.MemEnd)
	}
	return nil
}

// barMap is where a BAR is registered on the MMIO or port bus.
type barMap struct {
	mapped bool
	base   uint64
	// refusedAt is the address a mapping was last refused at (overlap),
	// so that a guest retrying it is logged once.
	refused   bool
	refusedAt uint64
}

type slotEntry struct {
	name string
	fn   Function
	cfg  *ConfigSpace
	maps [NumBARs]barMap
}

// Bus is PCI bus 0. It serializes configuration accesses (from both
// mechanisms) and keeps the BARs' mappings on the MMIO and port buses in
// step with the guest's programming. Function callbacks (interceptors,
// BAR accesses) must not call back into the Bus.
type Bus struct {
	layout    Layout
	mmio, pio *devices.Bus
	log       *slog.Logger

	mu        sync.Mutex
	conf1Addr uint32
	slots     [NumSlots]*slotEntry
}

// NewBus creates bus 0 with layout l: it registers mechanism #1 (ports
// 0xCF8..0xCFB and 0xCFC..0xCFF) on pio, the ECAM window on mmio and the
// host bridge at slot 0. log receives refused BAR mappings (nil: discard).
func NewBus(l Layout, mmio, pio *devices.Bus, log *slog.Logger) (*Bus, error) {
	if err := l.check(); err != nil {
		return nil, fmt.Errorf("PCI layout: %w", err)
	}
	if mmio == nil || pio == nil {
		return nil, fmt.Errorf("PCI bus: nil MMIO or port bus")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Bus{layout: l, mmio: mmio, pio: pio, log: log}
	for _, r := range []struct {
		bus        *devices.Bus
		name       string
		base, size uint64
		dev        devices.Device
	}{
		{pio, "pci-conf1-address", Conf1AddressPort, 4, conf1Address{b}},
		{pio, "pci-conf1-data", Conf1DataPort, 4, conf1Data{b}},
		{mmio, "pci-ecam", l.ECAMBase, ECAMSize, ecam{b}},
	} {
		if err := r.bus.Register(r.name, r.base, r.size, r.dev); err != nil {
			return nil, fmt.Errorf("PCI bus: %w", err)
		}
	}
	hb := &hostBridge{cfg: NewConfigSpace(Header{
		VendorID: HostBridgeVendorID, DeviceID: HostBridgeDeviceID, ClassCode: HostBridgeClass,
	})}
	b.slots[0] = &slotEntry{name: HostBridgeName, fn: hb, cfg: hb.cfg}
	return b, nil
}

// hostBridge is the function at slot 0: a header and nothing else.
type hostBridge struct{ cfg *ConfigSpace }

func (h *hostBridge) Config() *ConfigSpace                 { return h.cfg }
func (h *hostBridge) BARRead(_ int, _ uint64, data []byte) { fill(data, 0xff) }
func (h *hostBridge) BARWrite(int, uint64, []byte)         {}

// Add puts fn at the lowest free slot (1..31), function 0, and places its
// BARs, naturally aligned, at the lowest free addresses of the memory or
// port window. name identifies the slot in State and logs and must be
// unique on the bus.
func (b *Bus) Add(name string, fn Function) (slot int, err error) {
	if name == "" || fn == nil || fn.Config() == nil {
		return 0, fmt.Errorf("PCI: adding %q: empty name, nil function or nil config space", name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	free := -1
	for i, s := range b.slots {
		switch {
		case s == nil:
			if free < 0 && i > 0 {
				free = i
			}
		case s.name == name:
			return 0, fmt.Errorf("PCI: adding %q: name already on the bus at slot %d", name, i)
		case s.cfg == fn.Config():
			return 0, fmt.Errorf("PCI: adding %q: its config space is already on the bus at slot %d", name, i)
		}
	}
	if free < 0 {
		return 0, fmt.Errorf("PCI: adding %q: all %d slots are taken", name, NumSlots-1)
	}
	s := &slotEntry{name: name, fn: fn, cfg: fn.Config()}
	b.slots[free] = s
	if err := b.placeLocked(s); err != nil {
		b.slots[free] = nil
		return 0, fmt.Errorf("PCI: adding %q: %w", name, err)
	}
	b.remapLocked()
	return free, nil
}

// span is a half-open address range.
type span struct{ start, end uint64 }

// placeLocked gives each BAR of s an address in its window. s is already
// in b.slots, so BARs placed earlier count as used.
func (b *Bus) placeLocked(s *slotEntry) error {
	for _, bar := range s.cfg.BARs() {
		lo, hi := b.layout.MemBase, b.layout.MemEnd
		if bar.Kind == BARIO {
			lo, hi = b.layout.IOBase, b.layout.IOEnd
		}
		s.cfg.SetBARAddress(bar.Index, 0) // its own old address is not in the way
		addr, ok := firstFit(lo, hi, bar.Size, b.usedLocked(bar.Kind == BARIO))
		if !ok {
			return fmt.Errorf("BAR %d (%v, %#x bytes) does not fit in the window [%#x,%#x)",
				bar.Index, bar.Kind, bar.Size, lo, hi)
		}
		s.cfg.SetBARAddress(bar.Index, addr)
	}
	return nil
}

// usedLocked returns the ranges the BARs of every function occupy in the
// port space (io) or the memory space.
func (b *Bus) usedLocked(io bool) []span {
	var used []span
	for _, s := range b.slots {
		if s == nil {
			continue
		}
		for _, bar := range s.cfg.BARs() {
			if (bar.Kind == BARIO) == io && bar.Address != 0 && !bar.Sizing {
				used = append(used, span{bar.Address, bar.Address + bar.Size})
			}
		}
	}
	return used
}

// firstFit returns the lowest size-aligned address a with [a, a+size)
// inside [lo, hi) and clear of every used range. Each step moves a past
// one used range, so it ends after at most len(used)+1 steps.
func firstFit(lo, hi, size uint64, used []span) (uint64, bool) {
	a := alignUp(lo, size)
	for a >= lo && a < hi && size <= hi-a {
		clear := true
		for _, u := range used {
			if a < u.end && u.start < a+size {
				a, clear = alignUp(u.end, size), false
				break
			}
		}
		if clear {
			return a, true
		}
	}
	return 0, false
}

// alignUp rounds x up to a multiple of the power of two size (0 on
// overflow).
func alignUp(x, size uint64) uint64 { return (x + size - 1) &^ (size - 1) }

// remapLocked brings every BAR mapping in line with configuration space:
// first it removes the mappings that moved or were disabled, then it adds
// the missing ones, so that a BAR refused because of an overlap gets
// another chance when the other mapping goes away.
func (b *Bus) remapLocked() {
	for i, s := range b.slots {
		if s == nil {
			continue
		}
		for _, bar := range s.cfg.BARs() {
			want, ok := wantedBase(s.cfg, bar)
			if m := &s.maps[bar.Index]; m.mapped && (!ok || m.base != want) {
				b.unmapLocked(i, s, bar)
			}
		}
	}
	for i, s := range b.slots {
		if s == nil {
			continue
		}
		for _, bar := range s.cfg.BARs() {
			want, ok := wantedBase(s.cfg, bar)
			m := &s.maps[bar.Index]
			switch {
			case !ok:
				m.refused = false
			case !m.mapped:
				b.mapLocked(i, s, bar, want)
			}
		}
	}
}

// wantedBase returns where bar should be mapped: decoding enabled for its
// space, an address assigned and not the sizing pattern.
func wantedBase(c *ConfigSpace, bar BAR) (uint64, bool) {
	decode := uint16(CommandMemory)
	if bar.Kind == BARIO {
		decode = CommandIO
	}
	if c.Command()&decode == 0 || bar.Address == 0 || bar.Sizing {
		return 0, false
	}
	return bar.Address, true
}

func (b *Bus) busFor(k BARKind) *devices.Bus {
	if k == BARIO {
		return b.pio
	}
	return b.mmio
}

func (b *Bus) mapLocked(slotNum int, s *slotEntry, bar BAR, base uint64) {
	m := &s.maps[bar.Index]
	name := fmt.Sprintf("pci 00:%02x.0 %s BAR%d", slotNum, s.name, bar.Index)
	err := b.busFor(bar.Kind).Register(name, base, bar.Size, barDevice{fn: s.fn, bar: bar.Index})
	if err == nil {
		*m = barMap{mapped: true, base: base}
		return
	}
	if !m.refused || m.refusedAt != base {
		b.log.Warn("PCI: BAR left unmapped", "slot", slotNum, "name", s.name, "bar", bar.Index,
			"kind", bar.Kind.String(), "address", fmt.Sprintf("%#x", base), "size", fmt.Sprintf("%#x", bar.Size), "err", err)
	}
	*m = barMap{refused: true, refusedAt: base}
}

func (b *Bus) unmapLocked(slotNum int, s *slotEntry, bar BAR) {
	m := &s.maps[bar.Index]
	if err := b.busFor(bar.Kind).Unregister(m.base); err != nil {
		b.log.Error("PCI: unmapping BAR", "slot", slotNum, "name", s.name, "bar", bar.Index, "err", err)
	}
	*m = barMap{}
}

// barDevice routes a mapped BAR's accesses to its function.
type barDevice struct {
	fn  Function
	bar int
}

func (d barDevice) Read(offset uint64, data []byte)  { d.fn.BARRead(d.bar, offset, data) }
func (d barDevice) Write(offset uint64, data []byte) { d.fn.BARWrite(d.bar, offset, data) }

// lookupLocked returns the function at bus/device/function, or nil.
func (b *Bus) lookupLocked(bus, dev, fn uint32) *slotEntry {
	if bus != 0 || fn != 0 || dev >= NumSlots {
		return nil
	}
	return b.slots[dev]
}

// configAligned reports whether an access of n bytes at reg is one the
// bus forwards: 1, 2 or 4 bytes, naturally aligned.
func configAligned(reg uint32, n int) bool {
	return (n == 1 || n == 2 || n == 4) && reg%uint32(n) == 0
}

// configReadLocked reads the configuration space of a function; absent
// functions and bad accesses read all ones.
func (b *Bus) configReadLocked(bus, dev, fn, reg uint32, data []byte) {
	s := b.lookupLocked(bus, dev, fn)
	if s == nil || !configAligned(reg, len(data)) || reg >= ConfigSize {
		fill(data, 0xff)
		return
	}
	s.cfg.Read(int(reg), data)
}

// configWriteLocked writes a function's configuration space and remaps
// BARs if the command register or a BAR changed.
func (b *Bus) configWriteLocked(bus, dev, fn, reg uint32, data []byte) {
	s := b.lookupLocked(bus, dev, fn)
	if s == nil || !configAligned(reg, len(data)) || reg >= ConfigSize {
		return
	}
	s.cfg.Write(int(reg), data)
	end := reg + uint32(len(data))
	if overlaps(reg, end, RegCommand, RegCommand+2) || overlaps(reg, end, RegBAR0, RegBAR0+4*NumBARs) {
		b.remapLocked()
	}
}

func overlaps(a, b, c, d uint32) bool { return a < d && c < b }

// conf1Address is the address register at 0xCF8: 32-bit accesses only.
type conf1Address struct{ b *Bus }

func (d conf1Address) Read(offset uint64, data []byte) {
	if offset != 0 || len(data) != 4 {
		fill(data, 0xff)
		return
	}
	d.b.mu.Lock()
	binary.LittleEndian.PutUint32(data, d.b.conf1Addr)
	d.b.mu.Unlock()
}

func (d conf1Address) Write(offset uint64, data []byte) {
	if offset != 0 || len(data) != 4 {
		return
	}
	d.b.mu.Lock()
	d.b.conf1Addr = binary.LittleEndian.Uint32(data) & conf1Writable
	d.b.mu.Unlock()
}

// conf1Data is the data window at 0xCFC..0xCFF.
type conf1Data struct{ b *Bus }

// decode splits the address register plus the data port offset into
// bus, device, function and register; ok is false if it is disabled.
func decodeConf1(addr uint32, offset uint64) (bus, dev, fn, reg uint32, ok bool) {
	reg = addr&0xfc + uint32(offset&3)
	return addr >> 16 & 0xff, addr >> 11 & 0x1f, addr >> 8 & 7, reg, addr&conf1Enable != 0 && offset < 4
}

func (d conf1Data) Read(offset uint64, data []byte) {
	d.b.mu.Lock()
	defer d.b.mu.Unlock()
	bus, dev, fn, reg, ok := decodeConf1(d.b.conf1Addr, offset)
	if !ok || int(offset)+len(data) > 4 {
		fill(data, 0xff)
		return
	}
	d.b.configReadLocked(bus, dev, fn, reg, data)
}

func (d conf1Data) Write(offset uint64, data []byte) {
	d.b.mu.Lock()
	defer d.b.mu.Unlock()
	bus, dev, fn, reg, ok := decodeConf1(d.b.conf1Addr, offset)
	if !ok || int(offset)+len(data) > 4 {
		return
	}
	d.b.configWriteLocked(bus, dev, fn, reg, data)
}

// ecam is the memory-mapped configuration window of bus 0.
type ecam struct{ b *Bus }

func decodeECAM(offset uint64) (bus, dev, fn, reg uint32) {
	return uint32(offset >> 20), uint32(offset>>15) & 0x1f, uint32(offset>>12) & 7, uint32(offset) & 0xfff
}

func (e ecam) Read(offset uint64, data []byte) {
	e.b.mu.Lock()
	defer e.b.mu.Unlock()
	if offset >= ECAMSize {
		fill(data, 0xff)
		return
	}
	bus, dev, fn, reg := decodeECAM(offset)
	e.b.configReadLocked(bus, dev, fn, reg, data)
}

func (e ecam) Write(offset uint64, data []byte) {
	e.b.mu.Lock()
	defer e.b.mu.Unlock()
	if offset >= ECAMSize {
		return
	}
	bus, dev, fn, reg := decodeECAM(offset)
	e.b.configWriteLocked(bus, dev, fn, reg, data)
}

// SlotInfo describes an occupied slot, for inspection and tests.
type SlotInfo struct {
	Slot               int
	Name               string
	VendorID, DeviceID uint16
	ClassCode          uint32
	BARs               []BARInfo
}

// BARInfo is a BAR as the guest programmed it, and whether the bus maps it.
type BARInfo struct {
	BAR
	Mapped bool
}

// Slots returns the occupied slots in slot order.
func (b *Bus) Slots() []SlotInfo {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []SlotInfo
	for i, s := range b.slots {
		if s == nil {
			continue
		}
		h := s.cfg.Header()
		info := SlotInfo{Slot: i, Name: s.name, VendorID: h.VendorID, DeviceID: h.DeviceID, ClassCode: h.ClassCode}
		for _, bar := range s.cfg.BARs() {
			info.BARs = append(info.BARs, BARInfo{BAR: bar, Mapped: s.maps[bar.Index].mapped})
		}
		out = append(out, info)
	}
	return out
}

// BusState is bus 0 for save/restore.
type BusState struct {
	Slots []SlotState
	// Conf1Address is mechanism #1's address register: a guest may be
	// paused between writing it and using the data port.
	Conf1Address uint32
}

// SlotState is one function's configuration space.
type SlotState struct {
	Slot   int
	Name   string
	Config ConfigState
}

// State returns the configuration space of every function, host bridge
// included, in slot order.
func (b *Bus) State() BusState {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := BusState{Conf1Address: b.conf1Addr}
	for i, s := range b.slots {
		if s != nil {
			st.Slots = append(st.Slots, SlotState{Slot: i, Name: s.name, Config: s.cfg.State()})
		}
	}
	return st
}

// SetState restores every function's configuration space and re-derives
// the BAR mappings. The same functions must be at the same slots under
// the same names; nothing changes unless every slot's state is valid.
func (b *Bus) SetState(st BusState) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.checkStateLocked(st); err != nil {
		return fmt.Errorf("PCI bus state: %w", err)
	}
	for _, ss := range st.Slots {
		if err := b.slots[ss.Slot].cfg.SetState(ss.Config); err != nil {
			return fmt.Errorf("PCI bus state: slot %d (%s): %w", ss.Slot, ss.Name, err)
		}
	}
	b.conf1Addr = st.Conf1Address & conf1Writable
	for i, s := range b.slots {
		if s == nil {
			continue
		}
		for _, bar := range s.cfg.BARs() {
			if s.maps[bar.Index].mapped {
				b.unmapLocked(i, s, bar)
			}
			s.maps[bar.Index] = barMap{}
		}
	}
	b.remapLocked()
	return nil
}

func (b *Bus) checkStateLocked(st BusState) error {
	present := 0
	for _, s := range b.slots {
		if s != nil {
			present++
		}
	}
	if len(st.Slots) != present {
		return fmt.Errorf("%d slots saved, %d here", len(st.Slots), present)
	}
	var seen [NumSlots]bool
	for _, ss := range st.Slots {
		if ss.Slot < 0 || ss.Slot >= NumSlots || b.slots[ss.Slot] == nil || seen[ss.Slot] {
			return fmt.Errorf("slot %d (%s): absent here or saved twice", ss.Slot, ss.Name)
		}
		seen[ss.Slot] = true
		s := b.slots[ss.Slot]
		if s.name != ss.Name {
			return fmt.Errorf("slot %d holds %s, saved %s", ss.Slot, s.name, ss.Name)
		}
		if err := s.cfg.CheckState(ss.Config); err != nil {
			return fmt.Errorf("slot %d (%s): %w", ss.Slot, ss.Name, err)
		}
	}
	return nil
}
