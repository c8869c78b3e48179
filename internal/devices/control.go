package devices

import (
	"encoding/binary"
	"sync/atomic"
)

// The ferry control port: how a guest that knows it runs under ferry (the
// bundled test guest) talks to the VMM.
//
// The VMM registers it on the port I/O bus with four bytes:
//
//	bus.Register("ferry-control", ControlPort, ControlPorts, ctl)
//
// Protocol (all values little-endian, as x86 port I/O is):
//
//   - A 32-bit read (inl from 0xf4) returns ControlMagic, 0x46455259, the
//     ASCII bytes "FERY" read as a big-endian number. Narrower reads return
//     the corresponding bytes of that value; a guest that reads anything
//     else is not running under ferry (an unclaimed port reads all ones).
//   - A 32-bit write (outl to 0xf4) of a code:
//     0x00000000-0x000000ff: the guest is done; the VMM should stop the VM
//     and exit with that status (onExit(status) is called).
//     0x00000100-0xffffffff: reserved; counted (Reserved) and ignored.
//   - Any other write (narrower, or not at 0xf4) is ignored and counted
//     (Ignored).
const (
	ControlPort    = 0xf4 // QEMU's isa-debug-exit iobase too, so the test guest exits the same way on both
	ControlPorts   = 4
	ControlMagic   = 0x46455259 // "FERY"
	ControlExitMax = 0xff       // highest exit code
)

// Control is the ferry control port device.
type Control struct {
	onExit   func(status uint8)
	reserved atomic.Uint64
	ignored  atomic.Uint64
	lastCode atomic.Uint32
}

// NewControl returns a control port. onExit (may be nil) is called when the
// guest writes an exit code; it runs on the vCPU thread that made the access
// and must arrange for the VM to stop.
func NewControl(onExit func(status uint8)) *Control {
	return &Control{onExit: onExit}
}

// Reserved reports how many writes carried a reserved code.
func (c *Control) Reserved() uint64 { return c.reserved.Load() }

// LastReserved returns the last reserved code written (0 if none).
func (c *Control) LastReserved() uint32 { return c.lastCode.Load() }

// Ignored reports how many writes were not 32-bit writes at offset 0.
func (c *Control) Ignored() uint64 { return c.ignored.Load() }

// Read implements Device.
func (c *Control) Read(offset uint64, data []byte) {
	var magic [4]byte
	binary.LittleEndian.PutUint32(magic[:], ControlMagic)
	for i := range data {
		if o := offset + uint64(i); o < uint64(len(magic)) {
			data[i] = magic[o]
		} else {
			data[i] = 0xff
		}
	}
}

// Write implements Device.
func (c *Control) Write(offset uint64, data []byte) {
	if offset != 0 || len(data) != 4 {
		c.ignored.Add(1)
		return
	}
	code := binary.LittleEndian.Uint32(data)
	if code > ControlExitMax {
		c.reserved.Add(1)
		c.lastCode.Store(code)
		return
	}
	if c.onExit != nil {
		c.onExit(uint8(code))
	}
}
