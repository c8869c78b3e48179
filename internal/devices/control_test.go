package devices

import (
	"encoding/binary"
	"testing"
)

func TestControlMagic(t *testing.T) {
	bus := &Bus{}
	if err := bus.Register("ferry-control", ControlPort, ControlPorts, NewControl(nil)); err != nil {
		t.Fatal(err)
	}
	var d [4]byte
	bus.Read(ControlPort, d[:]) // inl
	if got := binary.LittleEndian.Uint32(d[:]); got != ControlMagic {
		t.Errorf("inl = %#x, want %#x", got, ControlMagic)
	}
	if string([]byte{d[3], d[2], d[1], d[0]}) != "FERY" {
		t.Errorf("magic spells %q", d)
	}
	var b [1]byte
	bus.Read(ControlPort+3, b[:]) // inb of the top byte
	if b[0] != 'F' {
		t.Errorf("inb at +3 = %#x", b[0])
	}
	var w [2]byte
	bus.Read(ControlPort+3, w[:]) // straddles the end of the device
	if w != [2]byte{'F', 0xff} {
		t.Errorf("straddling read % x", w)
	}
}

func TestControlWrites(t *testing.T) {
	for _, tc := range []struct {
		name     string
		offset   uint64
		data     []byte
		exit     int // -1: no exit
		reserved uint64
		ignored  uint64
	}{
		{"exit 0", 0, []byte{0, 0, 0, 0}, 0, 0, 0},
		{"exit 1", 0, []byte{1, 0, 0, 0}, 1, 0, 0},
		{"exit 255", 0, []byte{0xff, 0, 0, 0}, 255, 0, 0},
		{"reserved 0x100", 0, []byte{0, 1, 0, 0}, -1, 1, 0},
		{"reserved 0xdeadbeef", 0, []byte{0xef, 0xbe, 0xad, 0xde}, -1, 1, 0},
		{"byte write", 0, []byte{1}, -1, 0, 1},
		{"word write", 0, []byte{1, 0}, -1, 0, 1},
		{"dword at offset 1", 1, []byte{1, 0, 0, 0}, -1, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			exit := -1
			calls := 0
			c := NewControl(func(status uint8) { exit = int(status); calls++ })
			c.Write(tc.offset, tc.data)
			if exit != tc.exit || (tc.exit >= 0 && calls != 1) {
				t.Errorf("exit %d (%d calls), want %d", exit, calls, tc.exit)
			}
			if c.Reserved() != tc.reserved || c.Ignored() != tc.ignored {
				t.Errorf("reserved %d ignored %d, want %d %d", c.Reserved(), c.Ignored(), tc.reserved, tc.ignored)
			}
			if tc.reserved != 0 && c.LastReserved() != binary.LittleEndian.Uint32(tc.data) {
				t.Errorf("LastReserved %#x", c.LastReserved())
			}
		})
	}
	NewControl(nil).Write(0, []byte{3, 0, 0, 0}) // a nil callback is fine
}
