package devices

import "testing"

func TestACPIPMPoweroff(t *testing.T) {
	off := 0
	p := NewACPIPM(5, func() { off++ })
	var bus Bus
	if err := bus.Register("pm1evt", 0x600, 4, p.EventBlock()); err != nil {
		t.Fatal(err)
	}
	if err := bus.Register("pm1cnt", 0x604, 2, p.ControlBlock()); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	bus.Read(0x604, b)
	if b[0]&1 == 0 {
		t.Fatal("SCI_EN not set: guest would try to switch to ACPI mode")
	}
	bus.Write(0x602, []byte{0x21, 0x01}) // PM1_EN
	bus.Read(0x602, b)
	if b[0] != 0x21 || b[1] != 0x01 {
		t.Fatalf("PM1_EN reads %x", b)
	}
	// Sleep to S3 (type 1) does nothing; S5 powers off.
	bus.Write(0x604, []byte{0x01, 0x20 | 1<<2})
	if off != 0 {
		t.Fatal("S3 powered off")
	}
	bus.Write(0x604, []byte{0x01, 0x20 | 5<<2})
	if off != 1 {
		t.Fatal("S5 did not power off")
	}
	bus.Read(0x604, b)
	if b[1]&0x20 != 0 {
		t.Fatal("SLP_EN reads back")
	}
	s := p.State()
	q := NewACPIPM(5, nil)
	q.SetState(s)
	if q.State() != s {
		t.Fatal("state round trip")
	}
}
