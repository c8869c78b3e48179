package devices

import (
	"testing"
	"time"
)

// fakeClock is a settable host clock.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func newTestCMOS(t *testing.T, at time.Time) (*CMOS, *fakeClock, *Bus) {
	t.Helper()
	clk := &fakeClock{t: at}
	c := NewCMOS()
	c.now = clk.now
	bus := &Bus{}
	if err := bus.Register("cmos", CMOSBase, CMOSPorts, c); err != nil {
		t.Fatal(err)
	}
	return c, clk, bus
}

func cmosRead(bus *Bus, index uint8) uint8 {
	bus.Write(CMOSBase, []byte{index})
	var b [1]byte
	bus.Read(CMOSBase+1, b[:])
	return b[0]
}

func cmosWrite(bus *Bus, index, v uint8) {
	bus.Write(CMOSBase, []byte{index})
	bus.Write(CMOSBase+1, []byte{v})
}

// 2024-03-09 was a Saturday (day of week 7 with Sunday = 1).
var cmosTestTime = time.Date(2024, time.March, 9, 15, 4, 5, 0, time.UTC)

func TestCMOSClockFormats(t *testing.T) {
	idx := []uint8{rtcSeconds, rtcMinutes, rtcHours, rtcDayOfWeek, rtcDayOfMonth, rtcMonth, rtcYear, rtcCentury}
	for _, tc := range []struct {
		name    string
		statusB uint8
		at      time.Time
		want    []uint8
	}{
		{"BCD 24h", 0x02, cmosTestTime, []uint8{0x05, 0x04, 0x15, 0x07, 0x09, 0x03, 0x24, 0x20}},
		{"binary 24h", 0x06, cmosTestTime, []uint8{5, 4, 15, 7, 9, 3, 24, 20}},
		{"BCD 12h", 0x00, cmosTestTime, []uint8{0x05, 0x04, 0x83, 0x07, 0x09, 0x03, 0x24, 0x20}},
		{"binary 12h", 0x04, cmosTestTime, []uint8{5, 4, 0x83, 7, 9, 3, 24, 20}},
		{"BCD 12h midnight", 0x00, time.Date(1999, 12, 31, 0, 59, 59, 0, time.UTC),
			[]uint8{0x59, 0x59, 0x12, 0x06, 0x31, 0x12, 0x99, 0x19}},
		{"BCD 12h noon", 0x00, time.Date(2000, 1, 2, 12, 0, 0, 0, time.UTC),
			[]uint8{0x00, 0x00, 0x92, 0x01, 0x02, 0x01, 0x00, 0x20}},
		{"non-UTC host time is converted", 0x02, cmosTestTime.In(time.FixedZone("X", 5*3600)),
			[]uint8{0x05, 0x04, 0x15, 0x07, 0x09, 0x03, 0x24, 0x20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, bus := newTestCMOS(t, tc.at)
			cmosWrite(bus, rtcStatusB, tc.statusB)
			for i, r := range idx {
				if got := cmosRead(bus, r); got != tc.want[i] {
					t.Errorf("register %#02x = %#02x, want %#02x", r, got, tc.want[i])
				}
			}
		})
	}
}

func TestCMOSStatusRegisters(t *testing.T) {
	c, _, bus := newTestCMOS(t, cmosTestTime)
	for _, tc := range []struct {
		index uint8
		want  uint8
	}{
		{rtcStatusA, 0x26},
		{rtcStatusB, 0x02},
		{rtcStatusC, 0x00},
		{rtcStatusD, 0x80},
	} {
		if got := cmosRead(bus, tc.index); got != tc.want {
			t.Errorf("register %#02x = %#02x, want %#02x", tc.index, got, tc.want)
		}
	}
	cmosWrite(bus, rtcStatusA, 0xa6) // UIP is read-only
	if got := cmosRead(bus, rtcStatusA); got != 0x26 {
		t.Errorf("status A %#02x after write", got)
	}
	cmosWrite(bus, rtcStatusC, 0xff)
	cmosWrite(bus, rtcStatusD, 0x00)
	if cmosRead(bus, rtcStatusC) != 0 || cmosRead(bus, rtcStatusD) != 0x80 {
		t.Error("status C/D are writable")
	}

	// Index port bit 7 masks NMI and does not select the register.
	bus.Write(CMOSBase, []byte{0x80 | rtcStatusD})
	var b [1]byte
	bus.Read(CMOSBase+1, b[:])
	if b[0] != 0x80 || !c.NMIMasked() {
		t.Errorf("with NMI masked: read %#02x, masked %v", b[0], c.NMIMasked())
	}
	bus.Read(CMOSBase, b[:])
	if b[0] != 0x80|rtcStatusD {
		t.Errorf("index port reads %#02x", b[0])
	}
	cmosRead(bus, rtcStatusD)
	if c.NMIMasked() {
		t.Error("NMI still masked")
	}

	// Plain RAM, including the alarm registers.
	for _, i := range []uint8{0x01, 0x03, 0x05, 0x0f, 0x40, 0x7f} {
		cmosWrite(bus, i, i^0x5a)
		if got := cmosRead(bus, i); got != i^0x5a {
			t.Errorf("RAM %#02x = %#02x", i, got)
		}
	}
	// A 16-bit write sets index and data at once.
	bus.Write(CMOSBase, []byte{0x41, 0x99})
	if got := cmosRead(bus, 0x41); got != 0x99 {
		t.Errorf("16-bit write: %#02x", got)
	}
}

func TestCMOSClockRunsAndSets(t *testing.T) {
	_, clk, bus := newTestCMOS(t, cmosTestTime)
	clk.t = clk.t.Add(61 * time.Second)
	if s, m := cmosRead(bus, rtcSeconds), cmosRead(bus, rtcMinutes); s != 0x06 || m != 0x05 {
		t.Errorf("after 61s: %02x:%02x, want 05:06", m, s)
	}

	// Set the clock the way Linux's mc146818_set_time does.
	cmosWrite(bus, rtcStatusB, 0x02|rtcBSet|rtcBUIE)
	if b := cmosRead(bus, rtcStatusB); b != 0x82 {
		t.Errorf("status B %#02x: SET must clear UIE", b)
	}
	for _, w := range []struct{ i, v uint8 }{
		{rtcYear, 0x99}, {rtcCentury, 0x19}, {rtcMonth, 0x12}, {rtcDayOfMonth, 0x31},
		{rtcHours, 0x23}, {rtcMinutes, 0x59}, {rtcSeconds, 0x58},
	} {
		cmosWrite(bus, w.i, w.v)
	}
	clk.t = clk.t.Add(10 * time.Second) // frozen while SET
	if s := cmosRead(bus, rtcSeconds); s != 0x58 {
		t.Errorf("seconds %#02x while SET, want the written 0x58", s)
	}
	cmosWrite(bus, rtcStatusB, 0x02)
	clk.t = clk.t.Add(3 * time.Second)
	for _, tc := range []struct{ i, want uint8 }{
		{rtcSeconds, 0x01}, {rtcMinutes, 0x00}, {rtcHours, 0x00}, {rtcDayOfMonth, 0x01},
		{rtcMonth, 0x01}, {rtcYear, 0x00}, {rtcCentury, 0x20}, {rtcDayOfWeek, 0x07},
	} {
		if got := cmosRead(bus, tc.i); got != tc.want {
			t.Errorf("register %#02x = %#02x, want %#02x", tc.i, got, tc.want)
		}
	}

	// A single register written while the clock runs takes effect at once.
	cmosWrite(bus, rtcHours, 0x13)
	clk.t = clk.t.Add(time.Second)
	if h, s := cmosRead(bus, rtcHours), cmosRead(bus, rtcSeconds); h != 0x13 || s != 0x02 {
		t.Errorf("after setting hours: %02x..%02x, want 13..02", h, s)
	}

	// 12-hour binary mode, set 11 PM.
	cmosWrite(bus, rtcStatusB, rtcBSet|rtcBBinary)
	cmosWrite(bus, rtcHours, 0x80|11)
	cmosWrite(bus, rtcStatusB, rtcBBinary)
	cmosWrite(bus, rtcStatusB, 0x02) // back to BCD 24h
	if h := cmosRead(bus, rtcHours); h != 0x23 {
		t.Errorf("hours %#02x, want 0x23", h)
	}
}

func TestCMOSMemorySizes(t *testing.T) {
	const mib, gib = 1 << 20, 1 << 30
	for _, tc := range []struct {
		name      string
		low, high uint64
		ext       uint16 // 0x17/0x18 and 0x30/0x31
		above16   uint16 // 0x34/0x35
		above4G   uint32 // 0x5b-0x5d
	}{
		{"none", 0, 0, 0, 0, 0},
		{"4 MiB", 4 * mib, 0, 3072, 0, 0},
		{"16 MiB", 16 * mib, 0, 15360, 0, 0},
		{"512 MiB", 512 * mib, 0, 0xffff, 7936, 0},
		{"3 GiB + 5 GiB", 3 * gib, 5 * gib, 0xffff, 0xbf00, 0x14000},
		{"huge", 4 * gib, 1 << 50, 0xffff, 0xff00, 0xffffff},
		{"capped above 16 MiB", 1 << 33, 0, 0xffff, 0xffff, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _, bus := newTestCMOS(t, cmosTestTime)
			c.SetMemorySizes(tc.low, tc.high)
			r16 := func(i uint8) uint16 { return uint16(cmosRead(bus, i)) | uint16(cmosRead(bus, i+1))<<8 }
			if got := r16(0x15); got != 640 {
				t.Errorf("base memory %d KiB", got)
			}
			if got := r16(0x17); got != tc.ext {
				t.Errorf("0x17 = %d, want %d", got, tc.ext)
			}
			if got := r16(0x30); got != tc.ext {
				t.Errorf("0x30 = %d, want %d", got, tc.ext)
			}
			if got := r16(0x34); got != tc.above16 {
				t.Errorf("0x34 = %#x, want %#x", got, tc.above16)
			}
			got4G := uint32(cmosRead(bus, 0x5b)) | uint32(cmosRead(bus, 0x5c))<<8 | uint32(cmosRead(bus, 0x5d))<<16
			if got4G != tc.above4G {
				t.Errorf("0x5b = %#x, want %#x", got4G, tc.above4G)
			}
			var sum uint16
			for i := uint8(0x10); i < 0x2e; i++ {
				sum += uint16(cmosRead(bus, i))
			}
			if got := uint16(cmosRead(bus, 0x2e))<<8 | uint16(cmosRead(bus, 0x2f)); got != sum {
				t.Errorf("checksum %#x, want %#x", got, sum)
			}
		})
	}
}

func TestCMOSStateSaveRestore(t *testing.T) {
	c1, clk1, bus1 := newTestCMOS(t, cmosTestTime)
	c1.SetMemorySizes(1<<30, 0)
	cmosWrite(bus1, rtcMinutes, 0x30) // the guest moves its clock
	cmosWrite(bus1, 0x50, 0xab)
	bus1.Write(CMOSBase, []byte{0x80 | rtcSeconds})
	st := c1.State()
	if st.RAM[rtcMinutes] != 0x30 || st.RAM[0x50] != 0xab || !st.NMIDisabled || st.Index != rtcSeconds {
		t.Errorf("state %+v", st)
	}

	// Restore on a "different host" an hour later in host time: the guest
	// clock keeps its offset from the host clock.
	c2, clk2, bus2 := newTestCMOS(t, cmosTestTime)
	if err := c2.SetState(st); err != nil {
		t.Fatal(err)
	}
	clk1.t = clk1.t.Add(time.Hour)
	clk2.t = clk2.t.Add(time.Hour)
	var b1, b2 [1]byte
	bus1.Read(CMOSBase+1, b1[:])
	bus2.Read(CMOSBase+1, b2[:])
	if b1 != b2 || !c2.NMIMasked() {
		t.Errorf("selected register reads %#x vs %#x", b1[0], b2[0])
	}
	for i := uint8(0); i < 128; i++ {
		if r1, r2 := cmosRead(bus1, i), cmosRead(bus2, i); r1 != r2 {
			t.Errorf("register %#02x: %#02x before save, %#02x after restore", i, r1, r2)
		}
	}

	// A snapshot taken while the guest is setting the clock keeps the
	// frozen registers.
	cmosWrite(bus1, rtcStatusB, 0x82)
	cmosWrite(bus1, rtcSeconds, 0x42)
	c3, _, bus3 := newTestCMOS(t, cmosTestTime.Add(24*time.Hour))
	if err := c3.SetState(c1.State()); err != nil {
		t.Fatal(err)
	}
	if s := cmosRead(bus3, rtcSeconds); s != 0x42 {
		t.Errorf("frozen seconds %#02x, want 0x42", s)
	}
	cmosWrite(bus1, rtcStatusB, 0x02)
	cmosWrite(bus3, rtcStatusB, 0x02)
	for _, i := range []uint8{rtcSeconds, rtcMinutes, rtcHours, rtcDayOfMonth} {
		if r1, r3 := cmosRead(bus1, i), cmosRead(bus3, i); r1 != r3 {
			t.Errorf("register %#02x after setting: %#02x vs %#02x", i, r1, r3)
		}
	}
}
