package migration

import (
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/vmm"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// A destination whose TSC differs from the guest's beyond KVM's tolerance
// and cannot scale refuses a guest promised an invariant TSC, and accepts
// any other with a Notice for the source's report; it says nothing when
// the rates agree or KVM scales.
func TestCheckTSC(t *testing.T) {
	const guest, near, far = 2095985, 2095986, 2031000 // kHz: two lab hosts, and one 3 % slower
	for _, c := range []struct {
		name    string
		fit     vmm.TSCFit
		refuse  bool
		notices int
	}{
		{"rates agree", vmm.TSCFit{GuestKHz: guest, HostKHz: near, Invariant: true}, false, 0},
		{"KVM scales", vmm.TSCFit{GuestKHz: guest, HostKHz: far, Invariant: true, Scaling: true}, false, 0},
		{"rate unknown", vmm.TSCFit{HostKHz: far, Invariant: true}, false, 0},
		{"no scaling, no invariant TSC", vmm.TSCFit{GuestKHz: guest, HostKHz: far}, false, 1},
		{"no scaling, invariant TSC", vmm.TSCFit{GuestKHz: guest, HostKHz: far, Invariant: true}, true, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			notices, err := checkTSC(c.fit)
			if (err != nil) != c.refuse || len(notices) != c.notices {
				t.Fatalf("checkTSC = %v, %v; want refuse %v, %d notices", notices, err, c.refuse, c.notices)
			}
			if err != nil && !strings.Contains(err.Error(), "invariant TSC") {
				t.Errorf("the refusal does not say why: %v", err)
			}
			for _, n := range notices {
				if n.Code != wire.NoticeTSC || !strings.Contains(n.Text, "2031000 kHz") {
					t.Errorf("notice %+v", n)
				}
				// What the destination sends must be a valid message.
				if _, err := wire.Encode(n); err != nil {
					t.Error(err)
				}
			}
		})
	}
}
