package devices

import (
	"errors"
	"fmt"
	"reflect"
	"testing"
)

// kbc is a test driver for an I8042 registered on a bus as the VMM would.
type kbc struct {
	t      *testing.T
	bus    *Bus
	c      *I8042
	resets int
}

func newKBC(t *testing.T) *kbc {
	t.Helper()
	k := &kbc{t: t, bus: &Bus{}}
	k.c = NewI8042(func() { k.resets++ })
	if err := k.bus.Register("i8042-data", I8042DataPort, 1, k.c.DataPort()); err != nil {
		t.Fatal(err)
	}
	if err := k.bus.Register("i8042-cmd", I8042CommandPort, 1, k.c.CommandPort()); err != nil {
		t.Fatal(err)
	}
	return k
}

func (k *kbc) inb(port uint64) uint8 {
	var b [1]byte
	k.bus.Read(port, b[:])
	return b[0]
}

func (k *kbc) outb(port uint64, v uint8) { k.bus.Write(port, []byte{v}) }

func (k *kbc) status() uint8 { return k.inb(I8042CommandPort) }

var errKBCTimeout = errors.New("i8042 timeout")

// command works like Linux's i8042_command: cmd's bits 15:12 count the
// parameter bytes written, bits 11:8 the bytes read back into param.
func (k *kbc) command(param []byte, cmd uint16) error {
	send, recv := int(cmd>>12&0xf), int(cmd>>8&0xf)
	if k.status()&kbcStatIBFForTest != 0 {
		return errKBCTimeout
	}
	k.outb(I8042CommandPort, uint8(cmd))
	for i := 0; i < send; i++ {
		k.outb(I8042DataPort, param[i])
	}
	for i := 0; i < recv; i++ {
		st := k.status()
		if st&kbcStatOBF == 0 {
			return errKBCTimeout
		}
		if cmd == 0x11d3 && st&kbcStatAux == 0 {
			return errors.New("AUX loop answered from the keyboard side")
		}
		param[i] = k.inb(I8042DataPort)
	}
	return nil
}

const kbcStatIBFForTest = 0x02

func TestI8042PowerOn(t *testing.T) {
	k := newKBC(t)
	if st := k.status(); st != kbcStatSys|kbcStatUnlock {
		t.Errorf("status %#02x, want %#02x", st, kbcStatSys|kbcStatUnlock)
	}
	if d := k.inb(I8042DataPort); d != 0 {
		t.Errorf("empty data port reads %#02x", d)
	}
}

func TestI8042Commands(t *testing.T) {
	type write struct {
		port uint64
		v    uint8
	}
	cmd := func(v uint8) write { return write{I8042CommandPort, v} }
	data := func(v uint8) write { return write{I8042DataPort, v} }
	for _, tc := range []struct {
		name       string
		writes     []write
		wantStatus uint8 // before reading the output
		wantOut    []I8042Byte
		wantCTR    uint8
	}{
		{"self-test", []write{cmd(0xaa)}, 0x1d, []I8042Byte{{Value: 0x55}}, 0x65},
		{"read CTR", []write{cmd(0x20)}, 0x1d, []I8042Byte{{Value: 0x65}}, 0x65},
		{"other RAM", []write{cmd(0x21)}, 0x1d, []I8042Byte{{Value: 0}}, 0x65},
		{"write CTR", []write{cmd(0x60), data(0x47)}, 0x14, nil, 0x67},
		{"write CTR, system flag off", []write{cmd(0x60), data(0x30)}, 0x10, nil, 0x30},
		{"write other RAM", []write{cmd(0x61), data(0x47)}, 0x14, nil, 0x65},
		{"keyboard disable", []write{cmd(0xad)}, 0x1c, nil, 0x75},
		{"keyboard enable", []write{cmd(0xad), cmd(0xae)}, 0x1c, nil, 0x65},
		{"AUX disable", []write{cmd(0xa7)}, 0x1c, nil, 0x65},
		{"AUX enable fails: no AUX port", []write{cmd(0x60), data(0x47), cmd(0xa8)}, 0x1c, nil, 0x67},
		{"AUX test", []write{cmd(0xa9)}, 0x1d, []I8042Byte{{Value: 0}}, 0x65},
		{"keyboard test", []write{cmd(0xab)}, 0x1d, []I8042Byte{{Value: 0}}, 0x65},
		{"read output port", []write{cmd(0xd0)}, 0x1d, []I8042Byte{{Value: 0x03}}, 0x65},
		{"A20 off", []write{cmd(0xdd), cmd(0xd0)}, 0x1d, []I8042Byte{{Value: 0x01}}, 0x65},
		{"A20 on", []write{cmd(0xdd), cmd(0xdf), cmd(0xd0)}, 0x1d, []I8042Byte{{Value: 0x03}}, 0x65},
		{"write output port", []write{cmd(0xd1), data(0x01), cmd(0xd0)}, 0x1d, []I8042Byte{{Value: 0x01}}, 0x65},
		{"keyboard echo", []write{cmd(0xd2), data(0xab)}, 0x15, []I8042Byte{{Value: 0xab}}, 0x65},
		{"AUX loop", []write{cmd(0xd3), data(0x5a)}, 0x35, []I8042Byte{{Value: 0x5a, Aux: true}}, 0x65},
		{"to AUX device", []write{cmd(0xd4), data(0xf4)}, 0x14, nil, 0x65},
		{"to keyboard", []write{data(0xf2)}, 0x14, nil, 0x65},
		{"unknown command", []write{cmd(0xc0)}, 0x1c, nil, 0x65},
		{"command replaces pending one", []write{cmd(0x60), cmd(0xaa), data(0x00)}, 0x15, []I8042Byte{{Value: 0x55}}, 0x65},
		{"queue", []write{cmd(0xaa), cmd(0xd3), data(1), cmd(0x20)}, 0x1d,
			[]I8042Byte{{Value: 0x55}, {Value: 1, Aux: true}, {Value: 0x65}}, 0x65},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newKBC(t)
			for _, w := range tc.writes {
				k.outb(w.port, w.v)
			}
			if st := k.status(); st != tc.wantStatus {
				t.Errorf("status %#02x, want %#02x", st, tc.wantStatus)
			}
			var out []I8042Byte
			for i := 0; k.status()&kbcStatOBF != 0; i++ {
				if i > kbcOutMax {
					t.Fatal("output never drains")
				}
				aux := k.status()&kbcStatAux != 0
				out = append(out, I8042Byte{Value: k.inb(I8042DataPort), Aux: aux})
			}
			if !reflect.DeepEqual(out, tc.wantOut) {
				t.Errorf("output %+v, want %+v", out, tc.wantOut)
			}
			if st := k.c.State(); st.CTR != tc.wantCTR {
				t.Errorf("CTR %#02x, want %#02x", st.CTR, tc.wantCTR)
			}
			if k.resets != 0 {
				t.Errorf("%d resets", k.resets)
			}
			wantDropped := map[string]uint64{"to AUX device": 1, "to keyboard": 1, "command replaces pending one": 1}[tc.name]
			if got := k.c.DroppedKeyboardWrites(); got != wantDropped {
				t.Errorf("%d bytes dropped, want %d", got, wantDropped)
			}
		})
	}
}

func TestI8042Reset(t *testing.T) {
	for c := 0xf0; c <= 0xff; c++ {
		k := newKBC(t)
		k.outb(I8042CommandPort, uint8(c))
		want := 0
		if c&1 == 0 {
			want = 1
		}
		if k.resets != want || k.c.Resets() != uint64(want) {
			t.Errorf("command %#x: %d resets (counter %d), want %d", c, k.resets, k.c.Resets(), want)
		}
	}
	for _, tc := range []struct {
		port uint8
		want int
	}{{0xfe, 1}, {0x00, 1}, {0xdf, 0}, {0x03, 0}} {
		k := newKBC(t)
		k.outb(I8042CommandPort, 0xd1)
		k.outb(I8042DataPort, tc.port)
		if k.resets != tc.want {
			t.Errorf("output port %#x: %d resets, want %d", tc.port, k.resets, tc.want)
		}
	}
	// Linux's BOOT_KBD reboot: wait for IBF clear, write 0xFE.
	k := newKBC(t)
	for i := 0; i < 10; i++ {
		if k.status()&kbcStatIBFForTest != 0 {
			t.Fatal("input buffer full")
		}
		k.outb(I8042CommandPort, 0xfe)
	}
	if k.resets != 10 {
		t.Errorf("%d resets, want 10", k.resets)
	}
	NewI8042(nil).CommandPort().Write(0, []byte{0xfe}) // a nil callback is fine
}

// Linux's i8042 probe (i8042_controller_check, _selftest, _init,
// i8042_check_mux, i8042_check_aux) must find a controller with no AUX port
// without a single command timing out.
func TestI8042LinuxProbe(t *testing.T) {
	k := newKBC(t)
	flush := func() {
		for n := 0; k.status()&kbcStatOBF != 0; n++ {
			if n >= 16 {
				t.Fatal("flush: output buffer never empties")
			}
			k.inb(I8042DataPort)
		}
	}
	must := func(err error, what string) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	flush() // i8042_controller_check

	param := make([]byte, 1)
	must(k.command(param, 0x01aa), "selftest")
	if param[0] != 0x55 {
		t.Fatalf("selftest returned %#x", param[0])
	}

	ctr := make([]byte, 2)
	must(k.command(ctr[0:1], 0x0120), "read CTR")
	must(k.command(ctr[1:2], 0x0120), "read CTR again")
	if ctr[0] != ctr[1] {
		t.Fatal("unstable CTR")
	}
	if k.status()&kbcStatUnlock == 0 {
		t.Error("keylock active")
	}
	newCTR := ctr[0]&^kbcCtrKbdInt | kbcCtrKbdDis
	must(k.command([]byte{newCTR}, 0x1060), "write CTR")
	flush()

	// i8042_check_mux: the third loop byte must come back unchanged for
	// a controller without an active multiplexer.
	flush()
	for i, v := range []byte{0xf0, 0x56, 0xa4} {
		param[0] = v
		must(k.command(param, 0x11d3), "AUX loop")
		if param[0] != v {
			t.Fatalf("AUX loop %d returned %#x for %#x", i, param[0], v)
		}
	}

	// i8042_check_aux: loop works, AUX can be disabled but not enabled.
	flush()
	param[0] = 0x5a
	must(k.command(param, 0x11d3), "AUX loop")
	if param[0] != 0x5a {
		t.Fatalf("AUX loop returned %#x", param[0])
	}
	must(k.command(param, 0x00a7), "AUX disable")
	must(k.command(param, 0x0120), "read CTR")
	if param[0]&kbcCtrAuxDis == 0 {
		t.Fatal("AUX disable did not stick")
	}
	must(k.command(param, 0x00a8), "AUX enable")
	must(k.command(param, 0x0120), "read CTR")
	if param[0]&kbcCtrAuxDis == 0 {
		t.Fatal("AUX port enabled: there is none")
	}

	// i8042_enable_kbd_port.
	newCTR = newCTR&^kbcCtrKbdDis | kbcCtrKbdInt
	must(k.command([]byte{newCTR}, 0x1060), "write CTR")
	must(k.command(param, 0x0120), "read CTR")
	if param[0] != newCTR|kbcCtrAuxDis {
		t.Errorf("CTR %#x, want %#x", param[0], newCTR|kbcCtrAuxDis)
	}
	if k.status()&kbcStatOBF != 0 {
		t.Error("output left over")
	}
}

func TestI8042OutputBound(t *testing.T) {
	k := newKBC(t)
	for i := 0; i < 2*kbcOutMax; i++ {
		k.outb(I8042CommandPort, 0xaa)
	}
	n := 0
	for k.status()&kbcStatOBF != 0 {
		k.inb(I8042DataPort)
		n++
	}
	if n != kbcOutMax {
		t.Errorf("%d bytes queued, want %d", n, kbcOutMax)
	}
	if d := k.inb(I8042DataPort); d != 0x55 {
		t.Errorf("empty data port reads %#x, want the last byte 0x55", d)
	}
	// Wider and misplaced accesses.
	var b [2]byte
	k.c.CommandPort().Read(0, b[:])
	if b[1] != 0xff {
		t.Errorf("byte past the port reads %#x", b[1])
	}
	k.c.DataPort().Write(1, []byte{0xaa})
	k.c.CommandPort().Write(0, nil)
	if k.status()&kbcStatOBF != 0 {
		t.Error("misplaced write acted")
	}
}

func TestI8042StateSaveRestore(t *testing.T) {
	type step struct {
		port uint64
		read bool
		v    uint8
	}
	steps := []step{
		{port: I8042CommandPort, v: 0xaa},
		{port: I8042CommandPort, v: 0xd3},
		{port: I8042DataPort, v: 0x77},
		{port: I8042CommandPort, v: 0x60}, // pending
		{port: I8042CommandPort, read: true},
		{port: I8042DataPort, v: 0x07},
		{port: I8042CommandPort, read: true},
		{port: I8042DataPort, read: true},
		{port: I8042CommandPort, read: true},
		{port: I8042DataPort, read: true},
		{port: I8042CommandPort, v: 0x20},
		{port: I8042CommandPort, v: 0xad},
		{port: I8042DataPort, read: true},
		{port: I8042DataPort, read: true},
		{port: I8042CommandPort, read: true},
		{port: I8042CommandPort, v: 0xd1},
		{port: I8042DataPort, v: 0x00},
	}
	run := func(k *kbc, steps []step) []string {
		var log []string
		for _, s := range steps {
			if s.read {
				log = append(log, fmt.Sprintf("%#x=%#x", s.port, k.inb(s.port)))
			} else {
				k.outb(s.port, s.v)
				log = append(log, fmt.Sprintf("resets=%d", k.resets))
			}
		}
		return log
	}
	ref := run(newKBC(t), steps)
	for split := 0; split <= len(steps); split++ {
		k1 := newKBC(t)
		log := run(k1, steps[:split])
		k2 := newKBC(t)
		k2.resets = k1.resets
		if err := k2.c.SetState(k1.c.State()); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(k2.c.State(), k1.c.State()) {
			t.Fatalf("split %d: state %+v, want %+v", split, k2.c.State(), k1.c.State())
		}
		log = append(log, run(k2, steps[split:])...)
		if !reflect.DeepEqual(log, ref) {
			t.Fatalf("split %d: %v, want %v", split, log, ref)
		}
	}

	c := NewI8042(nil)
	if err := c.SetState(I8042State{Output: make([]I8042Byte, kbcOutMax+1)}); err == nil {
		t.Error("accepted an overfull output buffer")
	}
	if err := c.SetState(I8042State{PendingCommand: 0xaa}); err == nil {
		t.Error("accepted a pending command that takes no data")
	}
}
