package devices

import "testing"

func TestPost(t *testing.T) {
	p := NewPost()
	bus := &Bus{}
	if err := bus.Register("post", PostPort, 1, p); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	bus.Read(PostPort, b[:])
	if b[0] != 0 || p.Last() != 0 || p.Writes() != 0 {
		t.Errorf("fresh port: read %#x, Last %#x, Writes %d", b[0], p.Last(), p.Writes())
	}
	for _, v := range []uint8{0x01, 0x55, 0xaa, 0x00, 0xff} {
		bus.Write(PostPort, []byte{v})
		bus.Read(PostPort, b[:])
		if b[0] != v || p.Last() != v {
			t.Errorf("after writing %#x: read %#x, Last %#x", v, b[0], p.Last())
		}
	}
	if p.Writes() != 5 {
		t.Errorf("Writes = %d, want 5", p.Writes())
	}
	// A 16-bit write records its low byte; bytes past the port read ones.
	bus.Write(PostPort, []byte{0x34, 0x12})
	var w [2]byte
	bus.Read(PostPort, w[:])
	if w != [2]byte{0x34, 0xff} {
		t.Errorf("16-bit read % x", w)
	}

	q := NewPost()
	if err := q.SetState(p.State()); err != nil {
		t.Fatal(err)
	}
	if q.State() != p.State() || q.Last() != 0x34 {
		t.Errorf("restored %+v, want %+v", q.State(), p.State())
	}
}

func TestPostIgnoresMisplacedWrites(t *testing.T) {
	p := NewPost()
	p.Write(1, []byte{9})
	p.Write(0, nil)
	if p.Writes() != 0 || p.Last() != 0 {
		t.Errorf("misplaced writes recorded: %+v", p.State())
	}
}
