package devices

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Ports of the PC keyboard controller.
const (
	I8042DataPort    = 0x60 // read: output buffer; write: data / command parameter
	I8042CommandPort = 0x64 // read: status register; write: controller command
)

// I8042 is the PC's 8042 keyboard controller, emulated for what a PC guest
// expects of it rather than for input: no keyboard or mouse is attached and
// no interrupts are raised. It exists so that the guest can reset the machine
// through it (command 0xFE, the way Linux reboots with reboot=k, and output
// port writes that clear the reset bit) and so that probing drivers find a
// sane controller with nothing behind it.
//
// The controller occupies two non-adjacent ports (0x61 is the PIT/speaker
// port, owned by someone else), so the VMM registers its two halves
// separately, each one byte wide:
//
//	bus.Register("i8042-data", I8042DataPort, 1, kbc.DataPort())
//	bus.Register("i8042-cmd", I8042CommandPort, 1, kbc.CommandPort())
//
// Controller commands (written to port 0x64) that are implemented:
//
//	0x20-0x3F  read controller RAM; 0x20 returns the command byte (CTR),
//	           the rest read 0
//	0x60-0x7F  write controller RAM with the next data byte; 0x60 sets CTR
//	0xA7/0xA8  disable/enable the AUX (mouse) port. There is no AUX port:
//	           CTR's AUX-disable bit stays set, so enabling it fails the way
//	           Linux's i8042_toggle_aux test expects of a controller without one
//	0xA9       AUX interface test: 0x00
//	0xAA       controller self-test: 0x55
//	0xAB       keyboard interface test: 0x00 (no error)
//	0xAD/0xAE  disable/enable the keyboard interface (CTR bit 4)
//	0xD0       read the output port
//	0xD1       write the output port with the next data byte; a value with
//	           bit 0 (the CPU reset line, active low) clear resets the machine
//	0xD2/0xD3  echo the next data byte back as if it came from the keyboard /
//	           the AUX device (the latter is Linux's AUX loopback test)
//	0xD4       send the next data byte to the AUX device: dropped
//	0xDD/0xDF  disable/enable the A20 gate (recorded in the output port only)
//	0xF0-0xFF  pulse output port bits 3:0 low for each clear bit of the
//	           command; bit 0 clear (0xFE, ...) pulses reset
//
// Unknown commands are ignored. Data written to port 0x60 that is not the
// parameter of a command is for the keyboard, which is absent: it is dropped
// and counted, and nothing answers (a Linux guest's atkbd probe therefore
// times out quietly; i8042.nokbd avoids the wait).
//
// The status register reads 0x14 at power-on: system flag (mirroring CTR bit
// 2) and "keyboard not inhibited" set, input buffer always empty, output
// buffer full (bit 0, with bit 5 for AUX data) while responses are queued,
// bit 3 telling whether the last write was to the command port.
type I8042 struct {
	mu      sync.Mutex
	onReset func()

	ctr        uint8
	outPort    uint8
	lastCmd    bool  // last write went to the command port (status bit 3)
	pendingCmd uint8 // command waiting for its data byte; 0 for none
	out        []I8042Byte
	lastData   uint8

	resets  atomic.Uint64
	dropped atomic.Uint64
}

// I8042Byte is one byte in the controller's output buffer.
type I8042Byte struct {
	Value uint8
	Aux   bool // came from the AUX (mouse) side: status bit 5
}

// Status register bits.
const (
	kbcStatOBF    = 0x01
	kbcStatSys    = 0x04
	kbcStatCmd    = 0x08
	kbcStatUnlock = 0x10 // keyboard not inhibited
	kbcStatAux    = 0x20
)

// Command byte (CTR) bits.
const (
	kbcCtrKbdInt = 0x01
	kbcCtrSys    = 0x04
	kbcCtrKbdDis = 0x10
	kbcCtrAuxDis = 0x20
	kbcCtrXlate  = 0x40

	kbcCtrDefault = kbcCtrKbdInt | kbcCtrSys | kbcCtrAuxDis | kbcCtrXlate
)

// Output port bits.
const (
	kbcOutReset = 0x01 // CPU reset line, active low
	kbcOutA20   = 0x02

	kbcOutDefault = kbcOutReset | kbcOutA20
)

// kbcOutMax bounds the output queue; Linux flushes up to 16 bytes.
const kbcOutMax = 16

// NewI8042 returns a keyboard controller in its power-on state. onReset (may
// be nil) is called when the guest pulses the CPU reset line; it runs on the
// vCPU thread that made the access, with no device lock held, and must make
// the VMM reset or stop the machine.
func NewI8042(onReset func()) *I8042 {
	return &I8042{onReset: onReset, ctr: kbcCtrDefault, outPort: kbcOutDefault}
}

// DataPort returns the Device to register at port 0x60 (size 1).
func (c *I8042) DataPort() Device { return i8042Port{c: c, cmd: false} }

// CommandPort returns the Device to register at port 0x64 (size 1).
func (c *I8042) CommandPort() Device { return i8042Port{c: c, cmd: true} }

// Resets reports how many times the guest pulsed the reset line.
func (c *I8042) Resets() uint64 { return c.resets.Load() }

// DroppedKeyboardWrites reports bytes sent to the absent keyboard or mouse.
func (c *I8042) DroppedKeyboardWrites() uint64 { return c.dropped.Load() }

type i8042Port struct {
	c   *I8042
	cmd bool
}

func (p i8042Port) Read(offset uint64, data []byte) {
	c := p.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range data {
		switch {
		case offset+uint64(i) != 0:
			data[i] = 0xff
		case p.cmd:
			data[i] = c.status()
		default:
			data[i] = c.readData()
		}
	}
}

func (p i8042Port) Write(offset uint64, data []byte) {
	if offset != 0 || len(data) == 0 {
		return
	}
	c := p.c
	c.mu.Lock()
	var reset bool
	if p.cmd {
		reset = c.command(data[0])
	} else {
		reset = c.writeData(data[0])
	}
	c.mu.Unlock()
	if reset {
		c.resets.Add(1)
		if c.onReset != nil {
			c.onReset()
		}
	}
}

func (c *I8042) status() uint8 {
	st := uint8(kbcStatUnlock)
	if c.ctr&kbcCtrSys != 0 {
		st |= kbcStatSys
	}
	if c.lastCmd {
		st |= kbcStatCmd
	}
	if len(c.out) > 0 {
		st |= kbcStatOBF
		if c.out[0].Aux {
			st |= kbcStatAux
		}
	}
	return st
}

func (c *I8042) readData() uint8 {
	if len(c.out) > 0 {
		c.lastData = c.out[0].Value
		c.out = c.out[:copy(c.out, c.out[1:])]
	}
	// An empty output buffer reads as whatever it last held.
	return c.lastData
}

func (c *I8042) push(v uint8, aux bool) {
	if len(c.out) < kbcOutMax {
		c.out = append(c.out, I8042Byte{Value: v, Aux: aux})
	}
}

func (c *I8042) setCTR(v uint8) {
	c.ctr = v | kbcCtrAuxDis // there is no AUX port to enable
}

// command executes a controller command; it reports whether the reset line
// was pulsed.
func (c *I8042) command(cmd uint8) bool {
	c.lastCmd = true
	c.pendingCmd = 0
	switch {
	case cmd == 0x20:
		c.push(c.ctr, false)
	case cmd > 0x20 && cmd <= 0x3f:
		c.push(0, false)
	case cmd >= 0x60 && cmd <= 0x7f, cmd >= 0xd1 && cmd <= 0xd4:
		c.pendingCmd = cmd
	case cmd == 0xa7, cmd == 0xa8:
		c.ctr |= kbcCtrAuxDis
	case cmd == 0xa9, cmd == 0xab:
		c.push(0x00, false)
	case cmd == 0xaa:
		c.push(0x55, false)
	case cmd == 0xad:
		c.ctr |= kbcCtrKbdDis
	case cmd == 0xae:
		c.ctr &^= kbcCtrKbdDis
	case cmd == 0xd0:
		c.push(c.outPort, false)
	case cmd == 0xdd:
		c.outPort &^= kbcOutA20
	case cmd == 0xdf:
		c.outPort |= kbcOutA20
	case cmd >= 0xf0:
		return cmd&kbcOutReset == 0
	}
	return false
}

// writeData handles a byte written to the data port; it reports whether the
// reset line was pulsed.
func (c *I8042) writeData(v uint8) bool {
	c.lastCmd = false
	cmd := c.pendingCmd
	c.pendingCmd = 0
	switch {
	case cmd == 0x60:
		c.setCTR(v)
	case cmd > 0x60 && cmd <= 0x7f:
		// Other controller RAM is not kept.
	case cmd == 0xd1:
		// A clear bit 0 asserts reset; the machine resets and the line
		// is released, so the port keeps reading it as deasserted.
		c.outPort = v | kbcOutReset
		return v&kbcOutReset == 0
	case cmd == 0xd2:
		c.push(v, false)
	case cmd == 0xd3:
		c.push(v, true)
	default: // 0xd4 or no command: for a device that is not there
		c.dropped.Add(1)
	}
	return false
}

// I8042State is the keyboard controller's state, for save/restore.
type I8042State struct {
	CTR            uint8       // command byte
	OutputPort     uint8       // output port (bit 0 reset, bit 1 A20)
	LastWasCommand bool        // status bit 3
	PendingCommand uint8       // command awaiting its data byte, 0 for none
	Output         []I8042Byte // queued output, oldest first
	LastData       uint8       // what the data port reads when empty

	Resets  uint64
	Dropped uint64
}

// State returns a copy of the controller's state.
func (c *I8042) State() I8042State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return I8042State{
		CTR:            c.ctr,
		OutputPort:     c.outPort,
		LastWasCommand: c.lastCmd,
		PendingCommand: c.pendingCmd,
		Output:         append([]I8042Byte(nil), c.out...),
		LastData:       c.lastData,
		Resets:         c.resets.Load(),
		Dropped:        c.dropped.Load(),
	}
}

// SetState replaces the controller's state with st. It fails, changing
// nothing, if st is not a state the controller can be in.
func (c *I8042) SetState(st I8042State) error {
	if len(st.Output) > kbcOutMax {
		return fmt.Errorf("i8042 state: %d output bytes queued, at most %d", len(st.Output), kbcOutMax)
	}
	if p := st.PendingCommand; p != 0 && !(p >= 0x60 && p <= 0x7f || p >= 0xd1 && p <= 0xd4) {
		return fmt.Errorf("i8042 state: command %#02x takes no data byte", p)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setCTR(st.CTR)
	c.outPort = st.OutputPort
	c.lastCmd = st.LastWasCommand
	c.pendingCmd = st.PendingCommand
	c.out = append([]I8042Byte(nil), st.Output...)
	c.lastData = st.LastData
	c.resets.Store(st.Resets)
	c.dropped.Store(st.Dropped)
	return nil
}
