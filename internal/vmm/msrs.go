package vmm

import (
	"sort"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// Architectural MSRs ferry saves beyond what KVM_GET_MSR_INDEX_LIST lists
// (KVM leaves MTRRs and a few others to the VMM, as QEMU does).
var extraMSRs = func() []uint32 {
	l := []uint32{
		0x10,       // IA32_TSC
		0x1b,       // IA32_APIC_BASE
		0x277,      // IA32_PAT
		0x2ff,      // IA32_MTRR_DEF_TYPE
		0x250,      // MTRR_FIX64K_00000
		0x258,      // MTRR_FIX16K_80000
		0x259,      // MTRR_FIX16K_A0000
		0x1a0,      // IA32_MISC_ENABLE
		0x174,      // SYSENTER_CS
		0x175,      // SYSENTER_ESP
		0x176,      // SYSENTER_EIP
		0xc0000080, // EFER
		0xc0000081, // STAR
		0xc0000082, // LSTAR
		0xc0000083, // CSTAR
		0xc0000084, // SFMASK
		0xc0000100, // FS_BASE
		0xc0000101, // GS_BASE
		0xc0000102, // KERNEL_GS_BASE
		0xc0000103, // TSC_AUX
		0x3b,       // IA32_TSC_ADJUST
		0x6e0,      // IA32_TSC_DEADLINE
	}
	for i := uint32(0x268); i <= 0x26f; i++ { // MTRR_FIX4K_*
		l = append(l, i)
	}
	for i := uint32(0x200); i < 0x210; i++ { // variable MTRR base/mask pairs
		l = append(l, i)
	}
	return l
}()

// saveableMSRs probes which MSRs vCPU c can read: KVM's index list plus
// ferry's extras, each tried alone (KVM_GET_MSRS stops at the first MSR
// it cannot read). The result is sorted and reused for every vCPU.
func saveableMSRs(sys *kvm.System, c *kvm.VCPU) ([]uint32, error) {
	list, err := sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	seen := map[uint32]bool{}
	var out []uint32
	for _, idx := range append(list, extraMSRs...) {
		if seen[idx] {
			continue
		}
		seen[idx] = true
		e := []kvm.MSREntry{{Index: idx}}
		if n, err := c.GetMSRs(e); err == nil && n == 1 {
			out = append(out, idx)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, nil
}
