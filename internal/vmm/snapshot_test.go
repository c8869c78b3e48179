package vmm

import (
	"testing"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// TestRestoreOrderConstraints pins the dependencies between restore steps
// that KVM imposes (see the comment on restoreStep).
func TestRestoreOrderConstraints(t *testing.T) {
	pos := map[string]int{}
	for i, s := range vcpuRestoreOrder {
		pos[s.name] = i
	}
	for _, c := range [][2]string{
		{"cpuid", "msrs"}, {"cpuid", "xcrs"}, {"cpuid", "xsave"}, {"sregs", "regs"}, {"sregs", "xcrs"},
		{"sregs", "msrs"}, {"xcrs", "xsave"}, {"fpu", "xsave"}, {"lapic", "events"}, {"lapic", "mp_state"},
	} {
		a, okA := pos[c[0]]
		b, okB := pos[c[1]]
		if !okA || !okB || a >= b {
			t.Errorf("restore step %s must come before %s (positions %d, %d)", c[0], c[1], a, b)
		}
	}
}

// TestXCRsNeedCPUIDFirst shows the CPUID-first rule is real: KVM checks
// XCR0 against the XSAVE components the vCPU's CPUID advertises, so a
// guest's XCR0 with AVX is refused on a vCPU whose CPUID is not yet set,
// and accepted once it is.
func TestXCRsNeedCPUIDFirst(t *testing.T) {
	testguest.RequireKVM(t)
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	xcrs := kvm.XCRs{NrXCRs: 1}
	xcrs.XCRs[0] = kvm.XCR{XCR: 0, Value: 0x7} // x87 | SSE | AVX

	bare, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	if err := bare.SetCPUID2([]kvm.CPUIDEntry{{Function: 0, EAX: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := bare.SetXCRs(xcrs); err == nil {
		t.Fatal("KVM accepted XCR0 with AVX on a vCPU whose CPUID has no XSAVE leaf")
	}

	full, err := vm.CreateVCPU(1)
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()
	supported, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := full.SetCPUID2(guestCPUID(supported, 1, 2, 0)); err != nil {
		t.Fatal(err)
	}
	effective, _ := full.GetCPUID2()
	if e, ok := findLeaf(effective, 0xd, 0); !ok || e.EAX&0x7 != 0x7 {
		t.Skip("host offers no AVX state; nothing to restore")
	}
	if err := full.SetXCRs(xcrs); err != nil {
		t.Fatalf("XCR0 with AVX refused even with CPUID set: %v", err)
	}
}
