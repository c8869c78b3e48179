package devices

import (
	"encoding/binary"
	"sync"
)

// ACPIPM is the ACPI PM1a fixed-hardware register pair the FADT points at
// (see internal/boot/acpi.go): an event block of PM1_STS and PM1_EN, and a
// control block PM1_CNT. It exists so that an ACPI guest starts its ACPI
// subsystem cleanly and can power off: writing SLP_EN with SLP_TYP = S5
// calls onPoweroff. Register it twice: the event block (4 ports) and the
// control block (2 ports), through EventBlock and ControlBlock.
type ACPIPM struct {
	mu         sync.Mutex
	status     uint16 // PM1_STS, write-one-to-clear
	enable     uint16 // PM1_EN
	control    uint16 // PM1_CNT (SCI_EN always reads 1: no legacy mode)
	s5Type     uint16
	onPoweroff func()
}

// PM1_CNT bits.
const (
	pm1SCIEn    = 1 << 0
	pm1SlpEn    = 1 << 13
	pm1SlpShift = 10
	pm1SlpMask  = 7 << pm1SlpShift
)

// NewACPIPM returns the PM1 registers; s5Type is the SLP_TYP value the
// DSDT's \_S5 object gives for soft-off.
func NewACPIPM(s5Type uint8, onPoweroff func()) *ACPIPM {
	return &ACPIPM{control: pm1SCIEn, s5Type: uint16(s5Type), onPoweroff: onPoweroff}
}

// EventBlock is the device for PM1a_EVT_BLK (PM1_STS at +0, PM1_EN at +2).
func (p *ACPIPM) EventBlock() Device { return pmEvent{p} }

// ControlBlock is the device for PM1a_CNT_BLK.
func (p *ACPIPM) ControlBlock() Device { return pmControl{p} }

type pmEvent struct{ p *ACPIPM }
type pmControl struct{ p *ACPIPM }

// regs16 reads or writes one byte-addressed 16-bit register pair.
func get16(regs []uint16, offset uint64, data []byte) {
	var b [4]byte
	for i, r := range regs {
		binary.LittleEndian.PutUint16(b[2*i:], r)
	}
	for i := range data {
		if o := offset + uint64(i); o < uint64(2*len(regs)) {
			data[i] = b[o]
		} else {
			data[i] = 0xff
		}
	}
}

func (e pmEvent) Read(offset uint64, data []byte) {
	e.p.mu.Lock()
	defer e.p.mu.Unlock()
	get16([]uint16{e.p.status, e.p.enable}, offset, data)
}

func (e pmEvent) Write(offset uint64, data []byte) {
	e.p.mu.Lock()
	defer e.p.mu.Unlock()
	for i, v := range data {
		switch o := offset + uint64(i); o {
		case 0, 1: // PM1_STS: write one to clear
			e.p.status &^= uint16(v) << (8 * o)
		case 2, 3:
			shift := 8 * (o - 2)
			e.p.enable = e.p.enable&^(0xff<<shift) | uint16(v)<<shift
		}
	}
}

func (c pmControl) Read(offset uint64, data []byte) {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	get16([]uint16{c.p.control}, offset, data)
}

func (c pmControl) Write(offset uint64, data []byte) {
	c.p.mu.Lock()
	v := c.p.control
	for i, b := range data {
		if o := offset + uint64(i); o < 2 {
			v = v&^(0xff<<(8*o)) | uint16(b)<<(8*o)
		}
	}
	off := v&pm1SlpEn != 0 && (v&pm1SlpMask)>>pm1SlpShift == c.p.s5Type
	c.p.control = v&^pm1SlpEn | pm1SCIEn // SLP_EN is write-only
	cb := c.p.onPoweroff
	c.p.mu.Unlock()
	if off && cb != nil {
		cb()
	}
}

// ACPIPMState is the saved state of the PM1 registers.
type ACPIPMState struct {
	Status, Enable, Control uint16
}

// State returns the registers.
func (p *ACPIPM) State() ACPIPMState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return ACPIPMState{Status: p.status, Enable: p.enable, Control: p.control}
}

// SetState restores the registers.
func (p *ACPIPM) SetState(s ACPIPMState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.status, p.enable, p.control = s.Status, s.Enable, s.Control|pm1SCIEn
	return nil
}
