package state

import "fmt"

// msrNames names the MSRs ferry and KVM commonly save. Ranges (MTRRs,
// machine-check banks, x2APIC registers, performance counters) are named
// by msrRangeName.
var msrNames = map[uint32]string{
	0x00000010: "TSC",
	0x00000011: "KVM_WALL_CLOCK",
	0x00000012: "KVM_SYSTEM_TIME",
	0x0000001b: "APIC_BASE",
	0x00000034: "SMI_COUNT",
	0x0000003a: "FEATURE_CONTROL",
	0x0000003b: "TSC_ADJUST",
	0x00000048: "SPEC_CTRL",
	0x00000049: "PRED_CMD",
	0x0000008b: "UCODE_REV",
	0x000000ce: "PLATFORM_INFO",
	0x000000e7: "MPERF",
	0x000000e8: "APERF",
	0x000000fe: "MTRRcap",
	0x0000010a: "ARCH_CAPABILITIES",
	0x0000010b: "FLUSH_CMD",
	0x00000122: "TSX_CTRL",
	0x00000140: "MISC_FEATURES_ENABLES",
	0x00000174: "SYSENTER_CS",
	0x00000175: "SYSENTER_ESP",
	0x00000176: "SYSENTER_EIP",
	0x00000179: "MCG_CAP",
	0x0000017a: "MCG_STATUS",
	0x0000017b: "MCG_CTL",
	0x000001a0: "MISC_ENABLE",
	0x000001c4: "XFD",
	0x000001c5: "XFD_ERR",
	0x000001d9: "DEBUGCTL",
	0x00000250: "MTRRfix64K_00000",
	0x00000258: "MTRRfix16K_80000",
	0x00000259: "MTRRfix16K_A0000",
	0x00000268: "MTRRfix4K_C0000",
	0x00000269: "MTRRfix4K_C8000",
	0x0000026a: "MTRRfix4K_D0000",
	0x0000026b: "MTRRfix4K_D8000",
	0x0000026c: "MTRRfix4K_E0000",
	0x0000026d: "MTRRfix4K_E8000",
	0x0000026e: "MTRRfix4K_F0000",
	0x0000026f: "MTRRfix4K_F8000",
	0x00000277: "PAT",
	0x000002ff: "MTRRdefType",
	0x00000345: "PERF_CAPABILITIES",
	0x0000038d: "FIXED_CTR_CTRL",
	0x0000038e: "PERF_GLOBAL_STATUS",
	0x0000038f: "PERF_GLOBAL_CTRL",
	0x00000390: "PERF_GLOBAL_OVF_CTRL",
	0x000004d0: "MCG_EXT_CTL",
	0x00000480: "VMX_BASIC",
	0x00000481: "VMX_PINBASED_CTLS",
	0x00000482: "VMX_PROCBASED_CTLS",
	0x00000483: "VMX_EXIT_CTLS",
	0x00000484: "VMX_ENTRY_CTLS",
	0x00000485: "VMX_MISC",
	0x00000486: "VMX_CR0_FIXED0",
	0x00000487: "VMX_CR0_FIXED1",
	0x00000488: "VMX_CR4_FIXED0",
	0x00000489: "VMX_CR4_FIXED1",
	0x0000048a: "VMX_VMCS_ENUM",
	0x0000048b: "VMX_PROCBASED_CTLS2",
	0x0000048c: "VMX_EPT_VPID_CAP",
	0x0000048d: "VMX_TRUE_PINBASED_CTLS",
	0x0000048e: "VMX_TRUE_PROCBASED_CTLS",
	0x0000048f: "VMX_TRUE_EXIT_CTLS",
	0x00000490: "VMX_TRUE_ENTRY_CTLS",
	0x00000491: "VMX_VMFUNC",
	0x000006a0: "U_CET",
	0x000006a2: "S_CET",
	0x000006a4: "PL0_SSP",
	0x000006a5: "PL1_SSP",
	0x000006a6: "PL2_SSP",
	0x000006a7: "PL3_SSP",
	0x000006a8: "INT_SSP_TAB",
	0x000006e0: "TSC_DEADLINE",
	0x000006e1: "PKRS",
	0x00000da0: "XSS",
	0x40000000: "HV_GUEST_OS_ID",
	0x40000001: "HV_HYPERCALL",
	0x40000002: "HV_VP_INDEX",
	0x40000010: "HV_VP_RUNTIME",
	0x40000020: "HV_TIME_REF_COUNT",
	0x40000021: "HV_REFERENCE_TSC",
	0x40000073: "HV_VP_ASSIST_PAGE",
	0x4b564d00: "KVM_WALL_CLOCK_NEW",
	0x4b564d01: "KVM_SYSTEM_TIME_NEW",
	0x4b564d02: "KVM_ASYNC_PF_EN",
	0x4b564d03: "KVM_STEAL_TIME",
	0x4b564d04: "KVM_PV_EOI_EN",
	0x4b564d05: "KVM_POLL_CONTROL",
	0x4b564d06: "KVM_ASYNC_PF_INT",
	0x4b564d07: "KVM_ASYNC_PF_ACK",
	0x4b564d08: "KVM_MIGRATION_CONTROL",
	0xc0000080: "EFER",
	0xc0000081: "STAR",
	0xc0000082: "LSTAR",
	0xc0000083: "CSTAR",
	0xc0000084: "SFMASK",
	0xc0000100: "FS_BASE",
	0xc0000101: "GS_BASE",
	0xc0000102: "KERNEL_GS_BASE",
	0xc0000103: "TSC_AUX",
	0xc0000104: "AMD_TSC_RATIO",
	0xc0010010: "AMD_SYSCFG",
	0xc0010015: "AMD_HWCR",
	0xc0010114: "AMD_VM_CR",
	0xc0010117: "AMD_VM_HSAVE_PA",
	0xc001011f: "AMD_VIRT_SPEC_CTRL",
}

// msrRangeName names MSRs that come in numbered families.
func msrRangeName(idx uint32) string {
	switch {
	case idx >= 0xc1 && idx <= 0xc8:
		return fmt.Sprintf("PMC%d", idx-0xc1)
	case idx >= 0x186 && idx <= 0x18d:
		return fmt.Sprintf("PERFEVTSEL%d", idx-0x186)
	case idx >= 0x200 && idx <= 0x21f:
		n := (idx - 0x200) / 2
		if idx%2 == 0 {
			return fmt.Sprintf("MTRRphysBase%d", n)
		}
		return fmt.Sprintf("MTRRphysMask%d", n)
	case idx >= 0x309 && idx <= 0x30c:
		return fmt.Sprintf("FIXED_CTR%d", idx-0x309)
	case idx >= 0x400 && idx < 0x480:
		bank, reg := (idx-0x400)/4, (idx-0x400)%4
		return fmt.Sprintf("MC%d_%s", bank, [...]string{"CTL", "STATUS", "ADDR", "MISC"}[reg])
	case idx >= 0x800 && idx <= 0x8ff:
		return fmt.Sprintf("X2APIC_%03X", (idx-0x800)<<4)
	case idx >= 0xc0010000 && idx <= 0xc0010003:
		return fmt.Sprintf("AMD_PERFEVTSEL%d", idx-0xc0010000)
	case idx >= 0xc0010004 && idx <= 0xc0010007:
		return fmt.Sprintf("AMD_PERFCTR%d", idx-0xc0010004)
	}
	return ""
}

// MSRName returns the conventional name of an MSR (without the IA32_ or
// MSR_ prefix: "EFER", "LSTAR", "TSC", "KVM_SYSTEM_TIME_NEW",
// "MTRRphysBase3"), or its index in hex ("0xc0011029") when it has none in
// ferry's table.
func MSRName(idx uint32) string {
	if n, ok := msrNames[idx]; ok {
		return n
	}
	if n := msrRangeName(idx); n != "" {
		return n
	}
	return fmt.Sprintf("%#x", idx)
}
