package vmm

import (
	"fmt"
	"strings"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// featureWord is one CPUID register that holds feature flags.
type featureWord struct {
	leaf, index uint32
	reg         string // "eax", "ebx", "ecx", "edx"
	ignore      uint32 // bits ferry or the guest's own state sets (not host features)
}

// featureWords are the CPUID registers whose bits a guest may rely on. A
// saved or migrating guest may only run where every bit it saw is
// available.
var featureWords = []featureWord{
	{leaf: 0x1, reg: "ecx", ignore: 1<<31 | 1<<27}, // hypervisor (ferry sets), OSXSAVE (mirrors CR4)
	{leaf: 0x1, reg: "edx", ignore: 1 << 28},       // HTT (ferry sets for SMP)
	{leaf: 0x7, reg: "ebx"},
	{leaf: 0x7, reg: "ecx", ignore: 1 << 4}, // OSPKE mirrors CR4
	{leaf: 0x7, reg: "edx"},
	{leaf: 0x7, index: 1, reg: "eax"},
	{leaf: 0xd, reg: "eax"},           // XCR0 components
	{leaf: 0xd, index: 1, reg: "eax"}, // XSAVEOPT, XSAVEC, XGETBV1, XSAVES
	{leaf: 0x80000001, reg: "ecx"},
	{leaf: 0x80000001, reg: "edx"},
	{leaf: 0x80000008, reg: "ebx"},
}

var featureNames = map[string]string{
	"1.0.ecx.0": "sse3", "1.0.ecx.1": "pclmulqdq", "1.0.ecx.9": "ssse3", "1.0.ecx.12": "fma",
	"1.0.ecx.13": "cx16", "1.0.ecx.19": "sse4_1", "1.0.ecx.20": "sse4_2", "1.0.ecx.21": "x2apic",
	"1.0.ecx.22": "movbe", "1.0.ecx.23": "popcnt", "1.0.ecx.24": "tsc_deadline", "1.0.ecx.25": "aes",
	"1.0.ecx.26": "xsave", "1.0.ecx.28": "avx", "1.0.ecx.29": "f16c", "1.0.ecx.30": "rdrand",
	"1.0.edx.0": "fpu", "1.0.edx.4": "tsc", "1.0.edx.5": "msr", "1.0.edx.9": "apic", "1.0.edx.12": "mtrr",
	"1.0.edx.16": "pat", "1.0.edx.23": "mmx", "1.0.edx.24": "fxsr", "1.0.edx.25": "sse", "1.0.edx.26": "sse2",
	"7.0.ebx.0": "fsgsbase", "7.0.ebx.3": "bmi1", "7.0.ebx.5": "avx2", "7.0.ebx.8": "bmi2", "7.0.ebx.9": "erms",
	"7.0.ebx.16": "avx512f", "7.0.ebx.17": "avx512dq", "7.0.ebx.18": "rdseed", "7.0.ebx.19": "adx",
	"7.0.ebx.29": "sha_ni", "7.0.ebx.30": "avx512bw", "7.0.ebx.31": "avx512vl",
	"7.0.ecx.1": "avx512vbmi", "7.0.ecx.8": "gfni", "7.0.ecx.9": "vaes", "7.0.ecx.10": "vpclmulqdq",
	"7.0.ecx.22": "rdpid", "7.0.edx.4": "fsrm", "7.0.edx.22": "amx_bf16", "7.0.edx.24": "amx_tile",
	"13.0.eax.1": "xcr0.sse", "13.0.eax.2": "xcr0.avx", "13.0.eax.5": "xcr0.opmask",
	"13.0.eax.6": "xcr0.zmm_hi256", "13.0.eax.7": "xcr0.hi16_zmm", "13.1.eax.0": "xsaveopt",
	"13.1.eax.1": "xsavec", "13.1.eax.3": "xsaves",
	"2147483649.0.ecx.0": "lahf_lm", "2147483649.0.ecx.5": "abm", "2147483649.0.edx.11": "syscall",
	"2147483649.0.edx.20": "nx", "2147483649.0.edx.26": "pdpe1gb", "2147483649.0.edx.27": "rdtscp",
	"2147483649.0.edx.29": "lm",
}

func cpuidReg(e kvm.CPUIDEntry, reg string) uint32 {
	switch reg {
	case "eax":
		return e.EAX
	case "ebx":
		return e.EBX
	case "ecx":
		return e.ECX
	}
	return e.EDX
}

func findLeaf(t []kvm.CPUIDEntry, leaf, index uint32) (kvm.CPUIDEntry, bool) {
	for _, e := range t {
		if e.Function == leaf && (e.Index == index || e.Flags&kvm.CPUIDFlagSignificantIndex == 0) {
			return e, true
		}
	}
	return kvm.CPUIDEntry{}, false
}

// CheckCPUID refuses a guest CPUID table (saved with its state) that uses a
// feature this host's KVM cannot provide, naming every missing feature.
func CheckCPUID(guest, host []kvm.CPUIDEntry) error {
	var missing []string
	for _, w := range featureWords {
		g, ok := findLeaf(guest, w.leaf, w.index)
		if !ok {
			continue
		}
		h, _ := findLeaf(host, w.leaf, w.index)
		lack := cpuidReg(g, w.reg) &^ cpuidReg(h, w.reg) &^ w.ignore
		for bit := uint32(0); bit < 32; bit++ {
			if lack&(1<<bit) == 0 {
				continue
			}
			key := fmt.Sprintf("%d.%d.%s.%d", w.leaf, w.index, w.reg, bit)
			name, ok := featureNames[key]
			if !ok {
				name = fmt.Sprintf("CPUID.%#x.%d:%s[%d]", w.leaf, w.index, strings.ToUpper(w.reg), bit)
			}
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("this host cannot provide CPU features the guest uses: %s", strings.Join(missing, ", "))
	}
	return nil
}
