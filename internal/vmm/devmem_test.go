package vmm

import (
	"errors"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// TestDevMemoryDirty: device writes reach FetchDirty's bitmap, indexed
// like KVM's (memfd pages), only while logging is on.
func TestDevMemoryDirty(t *testing.T) {
	mem, err := guestmem.New(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	d := newDevMemory(mem)
	d.Dirty(0x1000, 8) // logging off: not recorded
	bitmap := make([]uint64, len(d.dirty))
	if n := d.fetch(bitmap); n != 0 {
		t.Fatalf("recorded %d pages with logging off", n)
	}
	d.logging.Store(true)
	d.Dirty(0x2ff0, 0x20) // straddles pages 2 and 3
	d.Dirty(0x3000, 1)    // page 3 again
	d.Dirty(0x5000, 0)    // nothing written
	bitmap[0] = 1 << 3    // KVM already saw page 3
	if n := d.fetch(bitmap); n != 1 {
		t.Fatalf("fetch counted %d new pages, want 1 (page 2; page 3 was already set)", n)
	}
	if bitmap[0] != 1<<2|1<<3 {
		t.Fatalf("bitmap %#x, want pages 2 and 3", bitmap[0])
	}
	if n := d.fetch(bitmap); n != 0 {
		t.Fatalf("a second fetch found %d pages", n)
	}
}

// TestDevMemoryGate: the gate is asked before a device touches memory,
// and its refusal fails the access.
func TestDevMemoryGate(t *testing.T) {
	mem, err := guestmem.New(16 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	d := newDevMemory(mem)
	var asked [][2]uint64
	d.gate = func(gpa, n uint64) error {
		asked = append(asked, [2]uint64{gpa, n})
		if gpa >= 0x100000 {
			return errors.New("not here yet")
		}
		return nil
	}
	if b, err := d.Slice(0x1000, 16); err != nil || len(b) != 16 {
		t.Fatalf("Slice through an open gate: %v", err)
	}
	if _, err := d.Slice(0x100000, 16); err == nil {
		t.Fatal("Slice went through a refusing gate")
	}
	if len(asked) != 2 || asked[0] != [2]uint64{0x1000, 16} {
		t.Fatalf("gate asked %v", asked)
	}
}

func TestPCILayoutForBoot(t *testing.T) {
	l := pciLayout()
	c := bootPCI(l)
	if !c.Enabled() || c.ECAMBase != l.ECAMBase || c.MemBase != l.MemBase || c.MemEnd != l.MemEnd {
		t.Fatalf("boot PCI config %+v does not match the bus layout %+v", c, l)
	}
	if l.MemBase < guestmem.MMIOHoleStart || l.ECAMBase < guestmem.MMIOHoleStart {
		t.Fatalf("PCI windows %+v overlap RAM below the MMIO hole at %#x", l, uint64(guestmem.MMIOHoleStart))
	}
}
