package vmm

import (
	"fmt"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// TSCTolerancePPM is how far, in parts per million, a guest's TSC
// frequency may be from the host's for KVM to run it unscaled: the
// kernel's kvm.tsc_tolerance_ppm (arch/x86/kvm/x86.c), 250 by default.
// Beyond it KVM scales the guest's TSC in hardware where it can
// (KVM_CAP_TSC_CONTROL: AMD TSC ratio, Intel TSC scaling); where it
// cannot, KVM_SET_TSC_KHZ either refuses a rate below the host's ("user
// requested TSC rate below hardware speed") or accepts a higher one and
// runs the guest's TSC in catch-up mode: at the host's rate between exits,
// pushed forward at entries.
const TSCTolerancePPM = 250

// CPUID bits about the TSC.
const (
	leafAPM         = 0x80000007
	apmInvariantTSC = 1 << 8 // EDX: the TSC runs at a constant rate in every state
)

// TSCFit is what a host can do with the TSC frequency a guest was given.
type TSCFit struct {
	GuestKHz  uint32 // the guest's TSC frequency (0: unknown)
	HostKHz   uint32 // this host's, as KVM gives a new vCPU (0: unknown)
	Invariant bool   // the guest's CPUID promises an invariant TSC
	Scaling   bool   // KVM scales guest TSCs here (KVM_CAP_TSC_CONTROL)
}

// GuestTSCKHz returns the TSC frequency a guest was told in its CPUID
// timing leaf (0x40000010 EAX, which ferry sets at boot and keeps across
// saves and migrations), or 0 if the table has none.
func GuestTSCKHz(cpuid []kvm.CPUIDEntry) uint32 {
	for _, e := range cpuid {
		if e.Function == leafTiming {
			return e.EAX
		}
	}
	return 0
}

// InvariantTSC reports whether a CPUID table promises an invariant TSC
// (CPUID 0x80000007 EDX bit 8). ferry passes KVM's supported bit through,
// so guests on hosts whose TSC is constant and non-stop get the promise.
func InvariantTSC(cpuid []kvm.CPUIDEntry) bool {
	for _, e := range cpuid {
		if e.Function == leafAPM {
			return e.EDX&apmInvariantTSC != 0
		}
	}
	return false
}

// PPM is the guest's frequency's distance from the host's, in parts per
// million of the host's (positive: the guest's is higher).
func (f TSCFit) PPM() float64 {
	if f.HostKHz == 0 {
		return 0
	}
	return (float64(f.GuestKHz) - float64(f.HostKHz)) * 1e6 / float64(f.HostKHz)
}

// WithinTolerance reports whether KVM runs the guest's TSC unscaled here:
// the bounds are computed as KVM's adjust_tsc_khz does.
func (f TSCFit) WithinTolerance() bool {
	lo := uint64(f.HostKHz) * (1e6 - TSCTolerancePPM) / 1e6
	hi := uint64(f.HostKHz) * (1e6 + TSCTolerancePPM) / 1e6
	return uint64(f.GuestKHz) >= lo && uint64(f.GuestKHz) <= hi
}

// Problem says whether the guest's TSC can run here as it ran before. It
// returns "" when it can (frequencies unknown, within KVM's tolerance, or
// KVM scales); otherwise what goes wrong, and refuse is true when the
// guest must not run here: its CPUID promises an invariant TSC, so its
// kernel trusts the TSC as a clock and would keep time wrong (QEMU refuses
// such a migration too: a guest with invtsc migrates only with an explicit
// TSC frequency, and a destination that cannot provide it fails to start).
func (f TSCFit) Problem() (msg string, refuse bool) {
	if f.GuestKHz == 0 || f.HostKHz == 0 || f.WithinTolerance() || f.Scaling {
		return "", false
	}
	what := "KVM would run its TSC in catch-up mode (at this host's rate, pushed forward at VM entries: the guest sees it jump and drift against kvm-clock, and Linux marks it unstable)"
	if f.GuestKHz < f.HostKHz {
		what = "KVM refuses that rate (\"user requested TSC rate below hardware speed\"), so its TSC would run at this host's rate, faster than the guest believes"
	}
	msg = fmt.Sprintf("the guest's TSC runs at %d kHz, this host's at %d kHz (%+.1f ppm, beyond KVM's ±%d ppm) and KVM here cannot scale TSCs (no KVM_CAP_TSC_CONTROL): %s",
		f.GuestKHz, f.HostKHz, f.PPM(), TSCTolerancePPM, what)
	if f.Invariant {
		return msg + "; the guest's CPUID promises an invariant TSC (CPUID 0x80000007 EDX bit 8), so it must not run here", true
	}
	return msg, false
}

// TSCFit assesses a guest CPUID table (a migration's Hello, a saved
// vCPU's) against this VM's host: the guest's TSC frequency from its
// timing leaf, the host's as KVM gave this VM's first vCPU, and whether
// KVM scales.
func (v *VM) TSCFit(cpuid []kvm.CPUIDEntry) TSCFit {
	return TSCFit{
		GuestKHz:  GuestTSCKHz(cpuid),
		HostKHz:   v.hostTSCKHz,
		Invariant: InvariantTSC(cpuid),
		Scaling:   v.sys.CheckExtension(kvm.CapTSCControl) != 0,
	}
}
