package pci

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
)

// CapMSIX is the capability ID of MSI-X.
const CapMSIX = 0x11

// NoVector is the vector number meaning "no interrupt" (virtio's
// VIRTIO_MSI_NO_VECTOR); Notify ignores it.
const NoVector = 0xffff

// MaxMSIXVectors is the largest MSI-X table the capability can describe.
const MaxMSIXVectors = 2048

// MSI-X message control bits, and the layout of a table entry.
const (
	MSIXControlEnable   = 1 << 15
	MSIXControlFuncMask = 1 << 14

	msixEntrySize    = 16
	msixEntryControl = 12 // offset of vector control in an entry
	msixEntryMasked  = 1  // vector control bit 0
	msixCapBodySize  = 10 // message control, table offset/BIR, PBA offset/BIR
)

// MSIX is a function's MSI-X capability: its message control word in
// configuration space, and the vector table and pending-bit array (PBA)
// in one of its memory BARs. Its methods are safe for concurrent use.
//
// A message is sent only while the command register's Bus Master Enable
// bit is set (an MSI is a memory write): while it is clear, a message is
// left pending as for a masked vector, and sent when the guest sets it
// again. A configuration write clearing the bit returns only after every
// message already being sent has gone.
type MSIX struct {
	cfg      *ConfigSpace
	capOff   int // offset of the capability's ID byte
	bar      int
	tableOff uint64
	pbaOff   uint64
	vectors  int
	sender   MSISender

	// sending is held for reading from the decision to send messages
	// until they are sent, and taken for writing when Bus Master Enable
	// is cleared, to wait for those in flight. Taken before mu.
	sending sync.RWMutex

	mu    sync.Mutex // guards table, pba, log; taken before cfg's lock
	table []byte     // vectors × 16 bytes
	pba   []byte     // one bit per vector, whole qwords
	log   *slog.Logger
}

// msiMessage is one interrupt to deliver.
type msiMessage struct {
	vector uint16
	addr   uint64
	data   uint32
}

// NewMSIX adds an MSI-X capability with the given number of vectors
// (1..2048) to c. The table and the PBA live in memory BAR bar, which must
// already be defined, at tableOffset and pbaOffset (8-byte aligned, inside
// the BAR, not overlapping). Every vector starts masked, MSI-X disabled.
// Interrupts are delivered through s.
func NewMSIX(c *ConfigSpace, vectors int, bar int, tableOffset, pbaOffset uint64, s MSISender) (*MSIX, error) {
	m := &MSIX{cfg: c, bar: bar, tableOff: tableOffset, pbaOff: pbaOffset, vectors: vectors, sender: s,
		log: slog.Default()}
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("MSI-X: %w", err)
	}
	m.table = make([]byte, vectors*msixEntrySize)
	for v := range vectors {
		m.table[v*msixEntrySize+msixEntryControl] = msixEntryMasked
	}
	m.pba = make([]byte, pbaSize(vectors))
	body := make([]byte, msixCapBodySize)
	binary.LittleEndian.PutUint16(body[0:], uint16(vectors-1))
	binary.LittleEndian.PutUint32(body[2:], uint32(tableOffset)|uint32(bar))
	binary.LittleEndian.PutUint32(body[6:], uint32(pbaOffset)|uint32(bar))
	writable := make([]byte, msixCapBodySize)
	writable[1] = (MSIXControlEnable | MSIXControlFuncMask) >> 8
	off, err := c.AddCapability(CapMSIX, body, writable)
	if err != nil {
		return nil, fmt.Errorf("MSI-X: %w", err)
	}
	m.capOff = off
	c.Intercept(off+2, 2, msixControlWatch{m})
	c.Intercept(RegCommand, 2, msixCommandWatch{m})
	return m, nil
}

func pbaSize(vectors int) int { return (vectors + 63) / 64 * 8 }

// check validates NewMSIX's arguments against the BAR they name.
func (m *MSIX) check() error {
	if m.vectors < 1 || m.vectors > MaxMSIXVectors {
		return fmt.Errorf("%d vectors, want 1..%d", m.vectors, MaxMSIXVectors)
	}
	if m.sender == nil {
		return fmt.Errorf("nil MSISender")
	}
	if m.bar < 0 || m.bar >= NumBARs {
		return fmt.Errorf("BAR %d out of range", m.bar)
	}
	m.cfg.mu.Lock()
	d := m.cfg.bars[m.bar]
	m.cfg.mu.Unlock()
	if d.size == 0 || d.kind == BARIO {
		return fmt.Errorf("BAR %d is not a defined memory BAR", m.bar)
	}
	tableEnd, err := regionEnd("table", m.tableOff, uint64(m.vectors*msixEntrySize), d.size)
	if err != nil {
		return fmt.Errorf("BAR %d: %w", m.bar, err)
	}
	pbaEnd, err := regionEnd("PBA", m.pbaOff, uint64(pbaSize(m.vectors)), d.size)
	if err != nil {
		return fmt.Errorf("BAR %d: %w", m.bar, err)
	}
	if m.tableOff < pbaEnd && m.pbaOff < tableEnd {
		return fmt.Errorf("BAR %d: table [%#x,%#x) overlaps PBA [%#x,%#x)", m.bar, m.tableOff, tableEnd, m.pbaOff, pbaEnd)
	}
	return nil
}

// regionEnd checks that [off, off+size) is 8-byte aligned, fits in a BAR
// of barSize bytes and in the capability's 32-bit offset field.
func regionEnd(what string, off, size, barSize uint64) (uint64, error) {
	if off%8 != 0 {
		return 0, fmt.Errorf("%s offset %#x is not 8-byte aligned", what, off)
	}
	if off > barSize || size > barSize-off || off > 0xffffffff {
		return 0, fmt.Errorf("%s [%#x,+%#x) does not fit in the BAR (%#x bytes)", what, off, size, barSize)
	}
	return off + size, nil
}

// SetLogger sets where failures to deliver an interrupt on a guest's
// unmask are logged (Notify returns its errors instead). The default is
// slog.Default().
func (m *MSIX) SetLogger(l *slog.Logger) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l != nil {
		m.log = l
	}
}

// Vectors returns the table size.
func (m *MSIX) Vectors() int { return m.vectors }

// CapOffset returns the offset of the capability in configuration space.
func (m *MSIX) CapOffset() int { return m.capOff }

// BAR returns the index of the BAR holding the table and the PBA.
func (m *MSIX) BAR() int { return m.bar }

func (m *MSIX) control() uint16 { return m.cfg.read16(m.capOff + 2) }

// Enabled reports whether the guest has enabled MSI-X.
func (m *MSIX) Enabled() bool { return m.control()&MSIXControlEnable != 0 }

// region finds which structure offsetInBAR falls in: the table or the PBA,
// and the offset inside it.
func (m *MSIX) region(offsetInBAR uint64) (buf []byte, rel uint64, isTable, ok bool) {
	if offsetInBAR >= m.tableOff && offsetInBAR-m.tableOff < uint64(len(m.table)) {
		return m.table, offsetInBAR - m.tableOff, true, true
	}
	if offsetInBAR >= m.pbaOff && offsetInBAR-m.pbaOff < uint64(len(m.pba)) {
		return m.pba, offsetInBAR - m.pbaOff, false, true
	}
	return nil, 0, false, false
}

// Read serves a guest read of the table or the PBA at offsetInBAR (an
// offset in the BAR). It returns false, leaving data alone, if the access
// does not start in either; bytes past the end of the structure read as 0.
func (m *MSIX) Read(offsetInBAR uint64, data []byte) (handled bool) {
	buf, rel, _, ok := m.region(offsetInBAR)
	if !ok {
		return false
	}
	m.mu.Lock()
	n := copy(data, buf[rel:])
	m.mu.Unlock()
	fill(data[n:], 0)
	return true
}

// Write serves a guest write of the table or the PBA (read-only) at
// offsetInBAR. It returns false if the access does not start in either.
// Unmasking a vector that has its pending bit set delivers its message.
func (m *MSIX) Write(offsetInBAR uint64, data []byte) (handled bool) {
	_, rel, isTable, ok := m.region(offsetInBAR)
	if !ok {
		return false
	}
	if !isTable || len(data) == 0 {
		return true
	}
	m.sending.RLock()
	defer m.sending.RUnlock()
	m.mu.Lock()
	for k, v := range data {
		pos := rel + uint64(k)
		if pos >= uint64(len(m.table)) {
			break
		}
		mask := entryWritable(int(pos % msixEntrySize))
		m.table[pos] = m.table[pos]&^mask | v&mask
	}
	first := int(rel / msixEntrySize)
	last := min(int((rel+uint64(len(data))-1)/msixEntrySize), m.vectors-1)
	msgs := m.collectPendingLocked(first, last)
	m.mu.Unlock()
	m.sendAll(msgs)
	return true
}

// entryWritable is the guest-writable mask of byte i of a table entry:
// address and data, and the mask bit of vector control.
func entryWritable(i int) byte {
	switch {
	case i < msixEntryControl:
		return 0xff
	case i == msixEntryControl:
		return msixEntryMasked
	}
	return 0
}

// collectPendingLocked clears the pending bit of each vector in
// [first, last] that is pending and may now be delivered, and returns their
// messages.
func (m *MSIX) collectPendingLocked(first, last int) []msiMessage {
	ctl := m.control()
	if ctl&MSIXControlEnable == 0 || ctl&MSIXControlFuncMask != 0 || !m.busMaster() {
		return nil
	}
	var msgs []msiMessage
	for v := first; v <= last; v++ {
		if !m.pendingLocked(v) || m.maskedLocked(v) {
			continue
		}
		m.pba[v/8] &^= 1 << (v % 8)
		msgs = append(msgs, m.messageLocked(v))
	}
	return msgs
}

func (m *MSIX) sendAll(msgs []msiMessage) {
	for _, msg := range msgs {
		if err := m.send(msg); err != nil {
			m.mu.Lock()
			log := m.log
			m.mu.Unlock()
			log.Warn("MSI-X: delivering a pending interrupt", "err", err)
		}
	}
}

func (m *MSIX) send(msg msiMessage) error {
	if err := m.sender.SignalMSI(msg.addr, msg.data); err != nil {
		return fmt.Errorf("MSI-X vector %d (address %#x data %#x): %w", msg.vector, msg.addr, msg.data, err)
	}
	return nil
}

// busMaster reports whether the command register lets the function
// send messages.
func (m *MSIX) busMaster() bool { return m.cfg.Command()&CommandBusMaster != 0 }

func (m *MSIX) pendingLocked(v int) bool { return m.pba[v/8]&(1<<(v%8)) != 0 }

func (m *MSIX) maskedLocked(v int) bool {
	return m.table[v*msixEntrySize+msixEntryControl]&msixEntryMasked != 0
}

func (m *MSIX) messageLocked(v int) msiMessage {
	e := m.table[v*msixEntrySize:]
	return msiMessage{
		vector: uint16(v),
		addr:   binary.LittleEndian.Uint64(e[0:]),
		data:   binary.LittleEndian.Uint32(e[8:]),
	}
}

// Notify signals vector. NoVector does nothing; while MSI-X is disabled
// nothing happens and no error is returned; while the vector or the whole
// function is masked, or Bus Master Enable is clear, its pending bit is
// set instead, and the message is sent when the guest unmasks it (or sets
// Bus Master Enable).
func (m *MSIX) Notify(vector uint16) error {
	if vector == NoVector {
		return nil
	}
	v := int(vector)
	if v >= m.vectors {
		return fmt.Errorf("MSI-X: vector %d out of range (%d vectors)", v, m.vectors)
	}
	m.sending.RLock()
	defer m.sending.RUnlock()
	m.mu.Lock()
	ctl := m.control()
	if ctl&MSIXControlEnable == 0 {
		m.mu.Unlock()
		return nil
	}
	if ctl&MSIXControlFuncMask != 0 || m.maskedLocked(v) || !m.busMaster() {
		m.pba[v/8] |= 1 << (v % 8)
		m.mu.Unlock()
		return nil
	}
	msg := m.messageLocked(v)
	m.mu.Unlock()
	return m.send(msg)
}

// controlWritten runs after the guest wrote message control: clearing
// the function mask (or enabling MSI-X) delivers every pending, unmasked
// vector.
func (m *MSIX) controlWritten() {
	m.sending.RLock()
	defer m.sending.RUnlock()
	m.mu.Lock()
	msgs := m.collectPendingLocked(0, m.vectors-1)
	m.mu.Unlock()
	m.sendAll(msgs)
}

// msixControlWatch intercepts writes to message control.
type msixControlWatch struct{ m *MSIX }

func (w msixControlWatch) Read(int, []byte)  {}
func (w msixControlWatch) Write(int, []byte) { w.m.controlWritten() }

// commandWritten runs after the guest wrote the command register. With
// Bus Master Enable set, every pending, deliverable vector is sent; with
// it clear, it waits for the messages being sent (no new one starts:
// Notify now sees the bit clear).
func (m *MSIX) commandWritten() {
	if !m.busMaster() {
		m.sending.Lock()
		//lint:ignore SA2001 an empty critical section is the barrier wanted: it waits for a send in progress
		m.sending.Unlock()
		return
	}
	m.controlWritten()
}

// msixCommandWatch intercepts writes to the command register.
type msixCommandWatch struct{ m *MSIX }

func (w msixCommandWatch) Read(int, []byte)  {}
func (w msixCommandWatch) Write(int, []byte) { w.m.commandWritten() }

// MSIXState is the MSI-X table and PBA for save/restore (message control
// is in configuration space).
type MSIXState struct {
	Table []byte
	PBA   []byte
}

// State returns a copy of the table and the PBA.
func (m *MSIX) State() MSIXState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return MSIXState{Table: append([]byte(nil), m.table...), PBA: append([]byte(nil), m.pba...)}
}

// SetState restores the table and the PBA. It checks sizes and that no
// reserved bit is set; it delivers nothing.
func (m *MSIX) SetState(s MSIXState) error {
	if len(s.Table) != len(m.table) || len(s.PBA) != len(m.pba) {
		return fmt.Errorf("MSI-X state: table %d and PBA %d bytes, want %d and %d (%d vectors)",
			len(s.Table), len(s.PBA), len(m.table), len(m.pba), m.vectors)
	}
	for pos, b := range s.Table {
		if b&^entryWritable(pos%msixEntrySize) != 0 {
			return fmt.Errorf("MSI-X state: reserved bits set in vector %d control", pos/msixEntrySize)
		}
	}
	for v := m.vectors; v < len(s.PBA)*8; v++ {
		if s.PBA[v/8]&(1<<(v%8)) != 0 {
			return fmt.Errorf("MSI-X state: pending bit %d set beyond %d vectors", v, m.vectors)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.table, s.Table)
	copy(m.pba, s.PBA)
	return nil
}
