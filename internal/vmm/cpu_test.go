package vmm

import (
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// TestRegisterDumpNamesINITState: KVM on AMD resets a vCPU that
// triple-faulted before KVM_RUN reports KVM_EXIT_SHUTDOWN, so a guest
// failure read back as CS 0xf000:0xfff0 must not be taken for a vCPU that
// ran from the reset vector.
func TestRegisterDumpNamesINITState(t *testing.T) {
	var r kvm.Regs
	var s kvm.Sregs
	r.RIP, r.RFLAGS = 0xfff0, 2
	s.CS = kvm.Segment{Selector: 0xf000, Base: 0xffff0000, Limit: 0xffff, Present: 1, S: 1, Type: 0xb}
	s.CR0 = 0x60000010
	for _, cr0 := range []uint64{0x60000010, 0x10} { // CD and NW survive INIT
		s.CR0 = cr0
		if d := formatRegisters(r, s); !strings.Contains(d, "INIT") || !strings.Contains(d, "rip=0xfff0") {
			t.Fatalf("INIT state not named: %s", d)
		}
	}
	r.RIP = 0x100922 // a running guest
	s.CS = kvm.Segment{Selector: 0x23, L: 1, DPL: 3, Present: 1, S: 1, Type: 0xb}
	s.CR0 = 0x80000013
	if d := formatRegisters(r, s); strings.Contains(d, "INIT") {
		t.Fatalf("running guest's registers called INIT state: %s", d)
	}
}
