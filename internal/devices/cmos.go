package devices

import (
	"sync"
	"time"
)

// Ports of the CMOS RAM / real-time clock.
const (
	CMOSBase  = 0x70 // index port; bit 7 of a written index masks NMI
	CMOSPorts = 2    // 0x70 index, 0x71 data
)

// CMOS is the PC's MC146818-compatible real-time clock and its 128 bytes of
// battery-backed RAM. The VMM registers it once for both ports:
//
//	bus.Register("cmos", CMOSBase, CMOSPorts, cmos)
//
// Offset 0 (port 0x70) selects a register: bits 6:0 are the index, bit 7
// masks NMI (recorded, see NMIMasked; the VMM may honour it or not). Offset
// 1 (port 0x71) reads and writes the selected register.
//
// The clock registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of
// week (1 = Sunday), 0x07 day of month, 0x08 month, 0x09 year, and 0x32
// century) show the host's current UTC time plus an offset that the guest
// changes by setting the clock. Their format follows status register B:
// BCD unless bit 2 (DM) is set, 24-hour if bit 1 is set, otherwise 12-hour
// with bit 7 of the hours meaning PM. Setting B bit 7 (SET) freezes the
// clock registers so the guest can write a new time, which takes effect when
// SET is cleared; a clock register written while SET is clear takes effect
// at once. The day of week is derived from the date, never stored.
//
// Status A reads 0x26 (32.768 kHz divider, 1024 Hz rate) with update-in-
// progress (bit 7) always clear; status B defaults to 0x02 (24-hour BCD);
// status C reads 0 because the clock raises no interrupts (no periodic,
// alarm or update-ended interrupts are emulated and IRQ 8 is never driven);
// status D reads 0x80 (valid RAM and time). The alarm registers and all
// other bytes are plain RAM.
//
// SetMemorySizes fills in the memory size bytes that firmware and some boot
// loaders read.
type CMOS struct {
	mu          sync.Mutex
	now         func() time.Time
	index       uint8
	nmiDisabled bool
	ram         [128]byte
	offset      time.Duration // guest clock = host UTC + offset
}

// Register indices.
const (
	rtcSeconds    = 0x00
	rtcMinutes    = 0x02
	rtcHours      = 0x04
	rtcDayOfWeek  = 0x06
	rtcDayOfMonth = 0x07
	rtcMonth      = 0x08
	rtcYear       = 0x09
	rtcStatusA    = 0x0a
	rtcStatusB    = 0x0b
	rtcStatusC    = 0x0c
	rtcStatusD    = 0x0d
	rtcCentury    = 0x32

	cmosBaseMemLo  = 0x15 // base memory in KiB
	cmosExtMemLo   = 0x17 // memory above 1 MiB in KiB (capped at 0xffff)
	cmosChecksumHi = 0x2e // sum of 0x10..0x2d, big-endian
	cmosExtMem2Lo  = 0x30 // copy of 0x17/0x18
	cmosMem16MLo   = 0x34 // memory above 16 MiB in 64 KiB units
	cmosMem4GLo    = 0x5b // memory above 4 GiB in 64 KiB units, 3 bytes
)

// Status register bits.
const (
	rtcAUIP = 0x80 // status A: update in progress

	rtcBSet    = 0x80 // halt updates so the time can be set
	rtcBUIE    = 0x10 // update-ended interrupt enable
	rtcBBinary = 0x04 // data mode: binary instead of BCD
	rtcB24h    = 0x02 // 24-hour mode

	rtcDVRT = 0x80 // status D: valid RAM and time

	rtcHoursPM = 0x80 // 12-hour mode PM flag
)

// NewCMOS returns a CMOS/RTC whose clock reads the host's UTC time.
func NewCMOS() *CMOS {
	c := &CMOS{now: time.Now}
	c.ram[rtcStatusA] = 0x26
	c.ram[rtcStatusB] = rtcB24h
	c.ram[rtcStatusD] = rtcDVRT
	c.setMemorySizes(0, 0)
	return c
}

// NMIMasked reports whether the guest last wrote the index port with bit 7
// (NMI disable) set.
func (c *CMOS) NMIMasked() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nmiDisabled
}

// SetMemorySizes records the guest's RAM for the firmware's memory bytes:
// lowBytes is the RAM below 4 GiB (counted from address 0), highBytes the
// RAM above 4 GiB. It sets 0x15/0x16 (base memory, 640 KiB), 0x17/0x18 and
// 0x30/0x31 (KiB above 1 MiB, at most 0xffff), 0x34/0x35 (64 KiB units
// above 16 MiB, at most 0xffff), 0x5b-0x5d (64 KiB units above 4 GiB, at
// most 0xffffff) and the checksum at 0x2e/0x2f.
func (c *CMOS) SetMemorySizes(lowBytes, highBytes uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setMemorySizes(lowBytes, highBytes)
}

func (c *CMOS) setMemorySizes(low, high uint64) {
	const kib, mib = 1 << 10, 1 << 20
	put16 := func(i int, v uint64) {
		c.ram[i] = uint8(v)
		c.ram[i+1] = uint8(v >> 8)
	}
	put16(cmosBaseMemLo, 640)
	var ext, above16 uint64
	if low > mib {
		ext = min((low-mib)/kib, 0xffff)
	}
	if low > 16*mib {
		above16 = min((low-16*mib)/(64*kib), 0xffff)
	}
	put16(cmosExtMemLo, ext)
	put16(cmosExtMem2Lo, ext)
	put16(cmosMem16MLo, above16)
	above4g := min(high/(64*kib), 0xffffff)
	c.ram[cmosMem4GLo] = uint8(above4g)
	c.ram[cmosMem4GLo+1] = uint8(above4g >> 8)
	c.ram[cmosMem4GLo+2] = uint8(above4g >> 16)
	var sum uint16
	for i := 0x10; i < cmosChecksumHi; i++ {
		sum += uint16(c.ram[i])
	}
	c.ram[cmosChecksumHi] = uint8(sum >> 8)
	c.ram[cmosChecksumHi+1] = uint8(sum)
}

// Read implements Device.
func (c *CMOS) Read(offset uint64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range data {
		switch offset + uint64(i) {
		case 0:
			// The index port is write-only on real parts; reading back
			// what was written is as good as anything.
			v := c.index
			if c.nmiDisabled {
				v |= 0x80
			}
			data[i] = v
		case 1:
			data[i] = c.readReg(c.index)
		default:
			data[i] = 0xff
		}
	}
}

// Write implements Device.
func (c *CMOS) Write(offset uint64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, v := range data {
		switch offset + uint64(i) {
		case 0:
			c.index = v & 0x7f
			c.nmiDisabled = v&0x80 != 0
		case 1:
			c.writeReg(c.index, v)
		}
	}
}

func isClockReg(i uint8) bool {
	switch i {
	case rtcSeconds, rtcMinutes, rtcHours, rtcDayOfWeek, rtcDayOfMonth, rtcMonth, rtcYear, rtcCentury:
		return true
	}
	return false
}

func (c *CMOS) setMode() bool { return c.ram[rtcStatusB]&rtcBSet != 0 }

func (c *CMOS) readReg(i uint8) uint8 {
	switch {
	case isClockReg(i) && !c.setMode():
		var regs [128]byte
		c.render(&regs, c.clock())
		return regs[i]
	case i == rtcStatusA:
		return c.ram[i] &^ rtcAUIP
	case i == rtcStatusC:
		v := c.ram[i] // interrupt flags: read clears them
		c.ram[i] = 0
		return v
	}
	return c.ram[i]
}

func (c *CMOS) writeReg(i uint8, v uint8) {
	switch {
	case i == rtcStatusA:
		c.ram[i] = v &^ rtcAUIP
	case i == rtcStatusB:
		wasSet := c.setMode()
		if v&rtcBSet != 0 {
			v &^= rtcBUIE // setting SET clears UIE
		}
		if !wasSet && v&rtcBSet != 0 {
			// Freeze the clock in the new format for the guest to edit.
			c.ram[i] = v
			c.render(&c.ram, c.clock())
			return
		}
		c.ram[i] = v
		if wasSet && v&rtcBSet == 0 {
			c.setClock(c.parse(&c.ram))
		}
	case i == rtcStatusC, i == rtcStatusD:
		// Read-only.
	case isClockReg(i) && !c.setMode():
		var regs [128]byte
		c.render(&regs, c.clock())
		regs[i] = v
		c.setClock(c.parse(&regs))
	default:
		c.ram[i] = v
	}
}

func (c *CMOS) clock() time.Time { return c.now().UTC().Add(c.offset) }

func (c *CMOS) setClock(t time.Time) { c.offset = t.Sub(c.now().UTC()) }

func (c *CMOS) binary() bool { return c.ram[rtcStatusB]&rtcBBinary != 0 }

func (c *CMOS) encode(v int) uint8 {
	if c.binary() {
		return uint8(v)
	}
	return uint8(v/10%10<<4 | v%10)
}

func (c *CMOS) decode(b uint8) int {
	if c.binary() {
		return int(b)
	}
	return int(b>>4)*10 + int(b&0x0f)
}

// render writes t into the clock registers of regs in the current format.
func (c *CMOS) render(regs *[128]byte, t time.Time) {
	regs[rtcSeconds] = c.encode(t.Second())
	regs[rtcMinutes] = c.encode(t.Minute())
	h := t.Hour()
	if c.ram[rtcStatusB]&rtcB24h != 0 {
		regs[rtcHours] = c.encode(h)
	} else {
		h12 := h % 12
		if h12 == 0 {
			h12 = 12
		}
		regs[rtcHours] = c.encode(h12)
		if h >= 12 {
			regs[rtcHours] |= rtcHoursPM
		}
	}
	regs[rtcDayOfWeek] = c.encode(int(t.Weekday()) + 1)
	regs[rtcDayOfMonth] = c.encode(t.Day())
	regs[rtcMonth] = c.encode(int(t.Month()))
	regs[rtcYear] = c.encode(t.Year() % 100)
	regs[rtcCentury] = c.encode(t.Year() / 100)
}

// parse reads a time from the clock registers of regs in the current
// format. Out-of-range fields are normalized as time.Date does.
func (c *CMOS) parse(regs *[128]byte) time.Time {
	var h int
	if c.ram[rtcStatusB]&rtcB24h != 0 {
		h = c.decode(regs[rtcHours])
	} else {
		h = c.decode(regs[rtcHours]&^rtcHoursPM) % 12
		if regs[rtcHours]&rtcHoursPM != 0 {
			h += 12
		}
	}
	century := c.decode(regs[rtcCentury])
	if century < 19 || century > 99 {
		century = 20
	}
	return time.Date(century*100+c.decode(regs[rtcYear]),
		time.Month(c.decode(regs[rtcMonth])), c.decode(regs[rtcDayOfMonth]),
		h, c.decode(regs[rtcMinutes]), c.decode(regs[rtcSeconds]), 0, time.UTC)
}

// CMOSState is the CMOS/RTC state, for save/restore.
type CMOSState struct {
	Index       uint8 // selected register (bits 6:0)
	NMIDisabled bool  // bit 7 of the last index written
	// RAM holds all 128 registers. While status B's SET bit is clear the
	// clock registers in it show the time when the state was taken and
	// SetState ignores them (the clock follows ClockOffset); while SET is
	// set they are the frozen values the guest is editing.
	RAM [128]byte
	// ClockOffset is the guest's clock minus the host's UTC clock.
	ClockOffset time.Duration
}

// State returns the device's state.
func (c *CMOS) State() CMOSState {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := CMOSState{Index: c.index, NMIDisabled: c.nmiDisabled, RAM: c.ram, ClockOffset: c.offset}
	if !c.setMode() {
		c.render(&st.RAM, c.clock())
	}
	return st
}

// SetState replaces the device's state with st. The clock continues from the
// host's current time plus st.ClockOffset.
func (c *CMOS) SetState(st CMOSState) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.index = st.Index & 0x7f
	c.nmiDisabled = st.NMIDisabled
	c.ram = st.RAM
	c.ram[rtcStatusA] &^= rtcAUIP
	c.offset = st.ClockOffset
	return nil
}
