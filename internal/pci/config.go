package pci

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
)

// Sizes of configuration space.
const (
	// ConfigSize is the size of a function's configuration space as ECAM
	// sees it.
	ConfigSize = 4096
	// LegacyConfigSize is the part mechanism #1 (ports 0xCF8/0xCFC) sees,
	// and the part capabilities are placed in.
	LegacyConfigSize = 256
)

// Offsets in a type-0 configuration header.
const (
	RegVendorID          = 0x00
	RegDeviceID          = 0x02
	RegCommand           = 0x04
	RegStatus            = 0x06
	RegRevision          = 0x08
	RegClassCode         = 0x09 // 3 bytes: prog-if, subclass, base class
	RegCacheLineSize     = 0x0c
	RegHeaderType        = 0x0e
	RegBAR0              = 0x10
	RegSubsystemVendorID = 0x2c
	RegSubsystemID       = 0x2e
	RegExpansionROM      = 0x30
	RegCapabilities      = 0x34
	RegInterruptLine     = 0x3c
	RegInterruptPin      = 0x3d

	// FirstCapability is where the capability list starts.
	FirstCapability = 0x40
)

// Command register bits.
const (
	CommandIO          = 1 << 0  // I/O space decode
	CommandMemory      = 1 << 1  // memory space decode
	CommandBusMaster   = 1 << 2  // the function may issue DMA (and MSIs)
	CommandParity      = 1 << 6  // parity error response
	CommandSERR        = 1 << 8  // SERR# enable
	CommandINTxDisable = 1 << 10 // INTx emulation disable

	commandWritable = CommandIO | CommandMemory | CommandBusMaster |
		CommandParity | CommandSERR | CommandINTxDisable
)

// Status register bits.
const (
	StatusCapList = 1 << 4 // the capability list at 0x34 is valid
	// statusW1C are the error bits software clears by writing ones:
	// master data parity error, signalled/received target abort,
	// received master abort, signalled system error, detected parity error.
	statusW1C = 1<<8 | 1<<11 | 1<<12 | 1<<13 | 1<<14 | 1<<15
)

// NumBARs is the number of BAR registers in a type-0 header.
const NumBARs = 6

// BAR size limits.
const (
	minIOBARSize  = 16
	maxIOBARSize  = 1 << 16 // the whole x86 port space
	minMemBARSize = 4096
	maxMem32Size  = 1 << 31
)

// Header holds the identification registers of a type-0 header.
type Header struct {
	VendorID, DeviceID, SubsystemVendorID, SubsystemID uint16
	ClassCode                                          uint32 // base class<<16 | subclass<<8 | prog-if
	Revision                                           uint8
}

// BARKind is what a BAR decodes.
type BARKind int

// BAR kinds.
const (
	BARMem32 BARKind = iota // 32-bit memory BAR, one register
	BARMem64                // 64-bit memory BAR, registers i and i+1
	BARIO                   // I/O-port BAR
)

func (k BARKind) String() string {
	switch k {
	case BARMem32:
		return "mem32"
	case BARMem64:
		return "mem64"
	case BARIO:
		return "io"
	}
	return fmt.Sprintf("BARKind(%d)", int(k))
}

type barDef struct {
	size    uint64 // 0: not a BAR (unused, or the upper half of a 64-bit BAR)
	kind    BARKind
	upper   bool // the register holds bits 63:32 of BAR i-1
	defined bool // size != 0 || upper
}

// Interceptor sees guest accesses to a range of configuration space
// registered with ConfigSpace.Intercept. off is relative to the range's
// start and data covers only the part of the access inside the range.
type Interceptor interface {
	Read(off int, data []byte)
	Write(off int, data []byte)
}

type intercept struct {
	start, end int
	i          Interceptor
}

// ConfigSpace is one function's configuration space: 4096 bytes, of which
// each bit is either read-only, guest-writable or write-one-to-clear.
// Its methods are safe for concurrent use. Interceptors are called without
// the ConfigSpace's lock held, so they may call its methods.
type ConfigSpace struct {
	mu    sync.Mutex
	data  [ConfigSize]byte
	wmask [ConfigSize]byte // guest-writable bits
	w1c   [ConfigSize]byte // write-one-to-clear bits
	bars  [NumBARs]barDef
	// lastCap is the offset of the last capability (0: none), capEnd
	// the first free offset after it.
	lastCap, capEnd int
	intercepts      []intercept
}

// NewConfigSpace returns a type-0 configuration space with the given
// identification, no BARs, no capabilities and interrupt pin 0 (the
// function signals through MSI-X only).
func NewConfigSpace(h Header) *ConfigSpace {
	c := &ConfigSpace{capEnd: FirstCapability}
	c.put16(RegVendorID, h.VendorID)
	c.put16(RegDeviceID, h.DeviceID)
	c.data[RegRevision] = h.Revision
	c.data[RegClassCode] = byte(h.ClassCode)
	c.data[RegClassCode+1] = byte(h.ClassCode >> 8)
	c.data[RegClassCode+2] = byte(h.ClassCode >> 16)
	c.put16(RegSubsystemVendorID, h.SubsystemVendorID)
	c.put16(RegSubsystemID, h.SubsystemID)
	binary.LittleEndian.PutUint16(c.wmask[RegCommand:], commandWritable)
	binary.LittleEndian.PutUint16(c.w1c[RegStatus:], statusW1C)
	c.wmask[RegCacheLineSize] = 0xff
	c.wmask[RegInterruptLine] = 0xff // scratch register for the OS
	return c
}

func (c *ConfigSpace) put16(off int, v uint16) { binary.LittleEndian.PutUint16(c.data[off:], v) }
func (c *ConfigSpace) put32(off int, v uint32) { binary.LittleEndian.PutUint32(c.data[off:], v) }

// DefineBAR declares BAR i: size bytes (a power of two, at least 16 for
// I/O and 4096 for memory) of the given kind. A 64-bit BAR occupies
// registers i and i+1. Call it before the function is added to a bus.
func (c *ConfigSpace) DefineBAR(i int, size uint64, kind BARKind, prefetchable bool) error {
	if err := checkBAR(i, size, kind, prefetchable); err != nil {
		return fmt.Errorf("BAR %d: %w", i, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bars[i].defined || (kind == BARMem64 && c.bars[i+1].defined) {
		return fmt.Errorf("BAR %d: register already in use", i)
	}
	off := RegBAR0 + 4*i
	mask := ^(size - 1)
	var flags uint32
	switch kind {
	case BARIO:
		flags = 1
		binary.LittleEndian.PutUint32(c.wmask[off:], uint32(mask)&^3)
	case BARMem32, BARMem64:
		if kind == BARMem64 {
			flags = 2 << 1
		}
		if prefetchable {
			flags |= 1 << 3
		}
		binary.LittleEndian.PutUint32(c.wmask[off:], uint32(mask)&^0xf)
	}
	c.put32(off, flags)
	c.bars[i] = barDef{size: size, kind: kind, defined: true}
	if kind == BARMem64 {
		binary.LittleEndian.PutUint32(c.wmask[off+4:], uint32(mask>>32))
		c.bars[i+1] = barDef{upper: true, defined: true}
	}
	return nil
}

func checkBAR(i int, size uint64, kind BARKind, prefetchable bool) error {
	last := NumBARs - 1
	if kind == BARMem64 {
		last--
	}
	if i < 0 || i > last {
		return fmt.Errorf("index out of range [0,%d] for a %v BAR", last, kind)
	}
	if bits.OnesCount64(size) != 1 {
		return fmt.Errorf("size %#x is not a power of two", size)
	}
	switch kind {
	case BARIO:
		if prefetchable {
			return fmt.Errorf("an I/O BAR cannot be prefetchable")
		}
		if size < minIOBARSize || size > maxIOBARSize {
			return fmt.Errorf("I/O size %#x outside [%#x,%#x]", size, minIOBARSize, maxIOBARSize)
		}
	case BARMem32:
		if size < minMemBARSize || size > maxMem32Size {
			return fmt.Errorf("32-bit memory size %#x outside [%#x,%#x]", size, minMemBARSize, maxMem32Size)
		}
	case BARMem64:
		if size < minMemBARSize {
			return fmt.Errorf("memory size %#x below %#x", size, minMemBARSize)
		}
	default:
		return fmt.Errorf("unknown kind %v", kind)
	}
	return nil
}

// AddCapability appends a capability to the list: id, then body. It
// returns the offset of the capability's id byte. writable is a per-byte
// mask of the body bits the guest may change (nil: read-only) and must be
// as long as body. Capabilities are placed 4-byte aligned from 0x40 in
// the first 256 bytes, chained in the order they are added.
func (c *ConfigSpace) AddCapability(id uint8, body []byte, writable []byte) (offset int, err error) {
	if writable != nil && len(writable) != len(body) {
		return 0, fmt.Errorf("capability %#x: writable mask is %d bytes, body %d", id, len(writable), len(body))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	off := c.capEnd
	end := off + 2 + len(body)
	if end > LegacyConfigSize {
		return 0, fmt.Errorf("capability %#x: %d bytes at %#x do not fit in the first %d bytes of configuration space",
			id, 2+len(body), off, LegacyConfigSize)
	}
	c.data[off] = id
	c.data[off+1] = 0
	copy(c.data[off+2:end], body)
	copy(c.wmask[off+2:end], writable)
	if c.lastCap == 0 {
		c.data[RegCapabilities] = byte(off)
	} else {
		c.data[c.lastCap+1] = byte(off)
	}
	c.data[RegStatus] |= StatusCapList
	c.lastCap = off
	c.capEnd = (end + 3) &^ 3
	return off, nil
}

// Intercept sends guest accesses overlapping [offset, offset+length) to i,
// after the generic read (which i may overwrite) or store. i sees only the
// overlapping part, with offsets relative to offset, and is called without
// the ConfigSpace's lock held. An empty or out-of-bounds range or a nil i
// is a programming error and panics.
func (c *ConfigSpace) Intercept(offset, length int, i Interceptor) {
	if i == nil || offset < 0 || length <= 0 || length > ConfigSize-offset {
		panic(fmt.Sprintf("pci: Intercept(%#x, %d): bad range or nil interceptor", offset, length))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.intercepts = append(c.intercepts, intercept{start: offset, end: offset + length, i: i})
}

// validAccess reports whether a guest access of n bytes at off is one
// ConfigSpace serves: 1, 2 or 4 bytes inside configuration space.
func validAccess(off, n int) bool {
	return (n == 1 || n == 2 || n == 4) && off >= 0 && off <= ConfigSize-n
}

// Read serves a guest read of len(data) (1, 2 or 4) bytes at off,
// little-endian. Out-of-range or odd-sized reads return all ones.
func (c *ConfigSpace) Read(off int, data []byte) {
	if !validAccess(off, len(data)) {
		fill(data, 0xff)
		return
	}
	c.mu.Lock()
	copy(data, c.data[off:])
	ics := c.intercepts
	c.mu.Unlock()
	callIntercepts(ics, off, data, false)
}

// Write serves a guest write: only writable bits change, ones written to
// write-one-to-clear bits clear them. Out-of-range or odd-sized writes are
// dropped.
func (c *ConfigSpace) Write(off int, data []byte) {
	if !validAccess(off, len(data)) {
		return
	}
	c.mu.Lock()
	for k, v := range data {
		o := off + k
		c.data[o] = c.data[o]&^c.wmask[o] | v&c.wmask[o]
		c.data[o] &^= v & c.w1c[o]
	}
	ics := c.intercepts
	c.mu.Unlock()
	callIntercepts(ics, off, data, true)
}

// callIntercepts passes the part of an access that overlaps each
// intercepted range to its Interceptor, without the lock held (Intercept
// only appends, so the slice read under the lock stays valid).
func callIntercepts(ics []intercept, off int, data []byte, write bool) {
	end := off + len(data)
	for _, ic := range ics {
		lo, hi := max(off, ic.start), min(end, ic.end)
		if lo >= hi {
			continue
		}
		part := data[lo-off : hi-off]
		if write {
			ic.i.Write(lo-ic.start, part)
		} else {
			ic.i.Read(lo-ic.start, part)
		}
	}
}

// Bytes returns a copy of the n bytes at off, or nil if that range is not
// inside configuration space.
func (c *ConfigSpace) Bytes(off, n int) []byte {
	if off < 0 || n < 0 || n > ConfigSize-off {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]byte, n)
	copy(out, c.data[off:])
	return out
}

// Command returns the command register.
func (c *ConfigSpace) Command() uint16 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return binary.LittleEndian.Uint16(c.data[RegCommand:])
}

// Header returns the identification registers.
func (c *ConfigSpace) Header() Header {
	c.mu.Lock()
	defer c.mu.Unlock()
	le := binary.LittleEndian
	return Header{
		VendorID:          le.Uint16(c.data[RegVendorID:]),
		DeviceID:          le.Uint16(c.data[RegDeviceID:]),
		SubsystemVendorID: le.Uint16(c.data[RegSubsystemVendorID:]),
		SubsystemID:       le.Uint16(c.data[RegSubsystemID:]),
		ClassCode:         le.Uint32(c.data[RegRevision:]) >> 8,
		Revision:          c.data[RegRevision],
	}
}

// BAR describes one BAR as the guest currently programs it.
type BAR struct {
	Index        int
	Kind         BARKind
	Size         uint64
	Prefetchable bool
	Address      uint64 // 0: unassigned
	// Sizing is true while a register of the BAR holds the all-ones
	// sizing pattern: the address is then not a placement.
	Sizing bool
}

// BARs returns the defined BARs in index order (a 64-bit BAR once, at its
// lower index).
func (c *ConfigSpace) BARs() []BAR {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []BAR
	for i, d := range c.bars {
		if d.size != 0 {
			out = append(out, c.barLocked(i))
		}
	}
	return out
}

func (c *ConfigSpace) barLocked(i int) BAR {
	d := c.bars[i]
	off := RegBAR0 + 4*i
	le := binary.LittleEndian
	lo, loMask := le.Uint32(c.data[off:]), le.Uint32(c.wmask[off:])
	b := BAR{Index: i, Kind: d.kind, Size: d.size, Prefetchable: lo&(1<<3) != 0 && d.kind != BARIO}
	b.Address = uint64(lo & loMask)
	b.Sizing = loMask != 0 && lo&loMask == loMask
	if d.kind == BARMem64 {
		hi, hiMask := le.Uint32(c.data[off+4:]), le.Uint32(c.wmask[off+4:])
		b.Address |= uint64(hi&hiMask) << 32
		b.Sizing = b.Sizing || (hi&hiMask == hiMask && hiMask != 0)
	}
	return b
}

// BARAddress returns the base address BAR i is programmed with (both
// registers of a 64-bit BAR combined), or 0 if it is unassigned, not
// defined, or the upper half of a 64-bit BAR.
func (c *ConfigSpace) BARAddress(i int) uint64 {
	if i < 0 || i >= NumBARs {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bars[i].size == 0 {
		return 0
	}
	return c.barLocked(i).Address
}

// SetBARAddress programs BAR i with addr, truncated to the BAR's
// alignment and width. It does nothing for an undefined BAR.
func (c *ConfigSpace) SetBARAddress(i int, addr uint64) {
	if i < 0 || i >= NumBARs {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	d := c.bars[i]
	if d.size == 0 {
		return
	}
	off := RegBAR0 + 4*i
	le := binary.LittleEndian
	lo, loMask := le.Uint32(c.data[off:]), le.Uint32(c.wmask[off:])
	c.put32(off, lo&^loMask|uint32(addr)&loMask)
	if d.kind == BARMem64 {
		hiMask := le.Uint32(c.wmask[off+4:])
		c.put32(off+4, uint32(addr>>32)&hiMask)
	}
}

// ConfigState is a function's configuration space for save/restore.
type ConfigState struct {
	Data []byte // ConfigSize bytes
}

// State returns a copy of configuration space.
func (c *ConfigSpace) State() ConfigState {
	return ConfigState{Data: c.Bytes(0, ConfigSize)}
}

// SetState restores configuration space. The state must come from a
// function built the same way: every read-only bit must match, as QEMU
// checks. Interceptors are not called.
func (c *ConfigSpace) SetState(s ConfigState) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.checkStateLocked(s); err != nil {
		return err
	}
	copy(c.data[:], s.Data)
	return nil
}

// CheckState reports whether SetState would accept s, without changing
// anything.
func (c *ConfigSpace) CheckState(s ConfigState) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.checkStateLocked(s)
}

func (c *ConfigSpace) checkStateLocked(s ConfigState) error {
	if len(s.Data) != ConfigSize {
		return fmt.Errorf("configuration space state is %d bytes, want %d", len(s.Data), ConfigSize)
	}
	for o, v := range s.Data {
		if diff := (v ^ c.data[o]) &^ (c.wmask[o] | c.w1c[o]); diff != 0 {
			return fmt.Errorf("configuration space state: read-only bits %#02x at offset %#x differ (saved %#02x, here %#02x): not the same function",
				diff, o, v, c.data[o])
		}
	}
	return nil
}

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}

// read16 returns the 16-bit register at off (inside configuration space).
func (c *ConfigSpace) read16(off int) uint16 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return binary.LittleEndian.Uint16(c.data[off:])
}
