package vmm

import (
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// The TSC frequency a guest was given and its invariant-TSC promise are
// read from its CPUID table as ferry builds it.
func TestGuestTSCFromCPUID(t *testing.T) {
	supported := []kvm.CPUIDEntry{
		{Function: 0x1},
		{Function: leafAPM, EDX: apmInvariantTSC},
		{Function: leafHypervisor, EAX: 0x40000001},
	}
	cpuid := guestCPUID(supported, 0, 2, 2095985)
	if got := GuestTSCKHz(cpuid); got != 2095985 {
		t.Errorf("GuestTSCKHz = %d, want 2095985", got)
	}
	if !InvariantTSC(cpuid) {
		t.Error("invariant TSC not seen")
	}
	if GuestTSCKHz(supported) != 0 || InvariantTSC(supported[:1]) {
		t.Error("a table without the timing leaf or the APM leaf has no frequency and no promise")
	}
}

func TestTSCFit(t *testing.T) {
	const host = 2_000_000 // kHz; KVM's bounds: 1,999,500 to 2,000,500
	for _, c := range []struct {
		name      string
		fit       TSCFit
		within    bool
		problem   string // "" or a part of it
		refuse    bool
		wantBelow bool
	}{
		{name: "same", fit: TSCFit{GuestKHz: host, HostKHz: host}, within: true},
		{name: "lab hosts 1 kHz apart", fit: TSCFit{GuestKHz: 2095986, HostKHz: 2095985, Invariant: true}, within: true},
		{name: "upper bound", fit: TSCFit{GuestKHz: 2_000_500, HostKHz: host, Invariant: true}, within: true},
		{name: "lower bound", fit: TSCFit{GuestKHz: 1_999_500, HostKHz: host, Invariant: true}, within: true},
		{name: "unknown guest rate", fit: TSCFit{HostKHz: host, Invariant: true}},
		{name: "unknown host rate", fit: TSCFit{GuestKHz: host, Invariant: true}},
		{name: "scaling", fit: TSCFit{GuestKHz: 2_600_000, HostKHz: host, Invariant: true, Scaling: true}},
		{name: "above, no scaling", fit: TSCFit{GuestKHz: 2_000_501, HostKHz: host}, problem: "catch-up mode"},
		{name: "below, no scaling", fit: TSCFit{GuestKHz: 1_999_499, HostKHz: host}, problem: "below hardware speed"},
		{name: "issue: 3.8% apart, invariant", fit: TSCFit{GuestKHz: 2_076_000, HostKHz: host, Invariant: true}, problem: "+38000.0 ppm", refuse: true},
		{name: "below, invariant", fit: TSCFit{GuestKHz: 1_900_000, HostKHz: host, Invariant: true}, problem: "invariant TSC", refuse: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.fit.GuestKHz != 0 && c.fit.HostKHz != 0 && c.fit.WithinTolerance() != c.within {
				t.Errorf("WithinTolerance = %v, want %v (%+.1f ppm)", !c.within, c.within, c.fit.PPM())
			}
			msg, refuse := c.fit.Problem()
			if (msg != "") != (c.problem != "") || !strings.Contains(msg, c.problem) || refuse != c.refuse {
				t.Fatalf("Problem() = %q, %v; want one with %q, refuse %v", msg, refuse, c.problem, c.refuse)
			}
			if msg != "" && (!strings.Contains(msg, "KVM_CAP_TSC_CONTROL") || !strings.Contains(msg, "250 ppm")) {
				t.Errorf("the message does not say why: %q", msg)
			}
			if msg != "" {
				t.Logf("%s", msg)
			}
		})
	}
}

func TestTSCElapsedNs(t *testing.T) {
	const khz = 2_000_000
	for _, c := range []struct {
		then, now uint64
		ns        uint64
		ok        bool
	}{
		{1_000_000, 1_000_000 + 64_000_000, 32_000_000, true}, // 32 ms: the lab's shift
		{1_000_000, 1_000_000, 0, true},
		{1_000_000, 999_999, 0, false},                // went backwards: PVM
		{1_000_000, 1_000_000 + 6*khz*1000, 0, false}, // 6 s: not a gap between two ioctls
		{0, 5, 0, false},                              // no saved TSC
	} {
		ns, ok := tscElapsedNs(c.then, c.now, khz)
		if ns != c.ns || ok != c.ok {
			t.Errorf("tscElapsedNs(%d, %d) = %d, %v; want %d, %v", c.then, c.now, ns, ok, c.ns, c.ok)
		}
	}
}
