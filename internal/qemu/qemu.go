// Package qemu runs the ferry test guest under QEMU (microvm machine, KVM
// acceleration) so that ferry can be compared with it on the same guest
// image. It owns everything ferry knows about QEMU: the command line, the
// QEMU process (Instance), the QMP protocol (Client) and QEMU's live
// migration (pre-copy, post-copy, hybrid) as the benchmarks drive it.
//
// It must not import the vmm, kvm or migration packages: QEMU is the
// other system, measured from outside.
package qemu

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"strconv"
)

// Binary is the QEMU system emulator ferry compares against.
const Binary = "qemu-system-x86_64"

// DefaultCPU is the CPU model used when Options.CPU is empty: "max" is
// every feature KVM supports, the CPUID ferry gives its guests, so both
// systems run the guest on the same CPU. ("host" fails under PVM: MSR
// 0x10a.)
//
// Under PVM, KVM reports neither XSAVE nor AVX as supported, so QEMU's
// vCPU has neither (see CPUFeature) and QEMU saves and restores only the
// x87/SSE state; yet the guest's CPUID shows the host's AVX and the guest
// uses it. Every QEMU state sync (a migration, even "info registers")
// then zeroes the upper halves of the YMM registers, which the verify
// workload reports when it catches a register soak in flight. On hosts
// with VMX/SVM, KVM reports AVX and QEMU carries the state.
const DefaultCPU = "max"

// Options describe a QEMU guest.
type Options struct {
	Kernel  string
	Cmdline string
	MemMiB  int
	CPUs    int
	Console io.Writer // the guest's serial console (QEMU's stdout)

	// CPU is the -cpu model; empty means DefaultCPU.
	CPU string
	// Incoming is the -incoming value: "defer" starts a destination that
	// waits for migrate-incoming (see MigrateIncoming), a URI listens at
	// once. Empty: a normal boot.
	Incoming string
	// Wrapper prefixes the QEMU command, e.g. {"ip", "netns", "exec", "NS"}
	// to run QEMU inside a network namespace.
	Wrapper []string
	// Stderr receives QEMU's own messages (warnings, errors); may be nil.
	// They are kept apart from Console so that they cannot split a guest
	// console line. The last few KiB are also kept for error messages.
	Stderr io.Writer
	// Extra arguments appended to the command line.
	Extra []string
}

// Available reports whether QEMU is installed.
func Available() error {
	if _, err := exec.LookPath(Binary); err != nil {
		return fmt.Errorf("%s not installed: %w", Binary, err)
	}
	return nil
}

// Args is the QEMU command line for opts: a microvm with no firmware
// option ROMs, the kernel booted by its PVH note, the first serial port on
// stdio, and isa-debug-exit at port 0xf4, where the test guest writes its
// exit status (QEMU exits with status*2+1).
func Args(o Options) []string {
	cpu := o.CPU
	if cpu == "" {
		cpu = DefaultCPU
	}
	args := []string{
		"-M", "microvm,x-option-roms=off,rtc=off",
		"-accel", "kvm",
		"-cpu", cpu,
		"-m", strconv.Itoa(o.MemMiB) + "M",
		"-smp", strconv.Itoa(o.CPUs),
		"-kernel", o.Kernel,
		"-append", o.Cmdline,
		"-nodefaults", "-no-user-config", "-nographic",
		"-serial", "stdio",
		"-no-reboot",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4",
	}
	if o.Incoming != "" {
		args = append(args, "-incoming", o.Incoming)
	}
	return append(args, o.Extra...)
}

// Run boots the guest under QEMU and waits for it to exit. It returns the
// guest's exit status as written to isa-debug-exit. QEMU is killed when
// ctx ends.
func Run(ctx context.Context, o Options) (int, error) {
	// No QMP socket: a guest that exits at once (a configuration error)
	// must still report its status rather than fail the QMP handshake.
	inst, err := start(ctx, o, false)
	if err != nil {
		return -1, err
	}
	defer inst.Close()
	return inst.Wait(ctx)
}
