// Package qemu runs the ferry test guest under QEMU (microvm machine, KVM
// acceleration) so that ferry can be compared with it on the same guest
// image. It builds QEMU command lines; later it will also drive QEMU's
// migration over QMP for the benchmarks.
//
// It must not import the vmm or kvm packages: QEMU is the other system.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
)

// Binary is the QEMU system emulator ferry compares against.
const Binary = "qemu-system-x86_64"

// Options describe a QEMU guest.
type Options struct {
	Kernel  string
	Cmdline string
	MemMiB  int
	CPUs    int
	Console io.Writer
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
	return []string{
		"-M", "microvm,x-option-roms=off,rtc=off",
		"-accel", "kvm",
		"-m", strconv.Itoa(o.MemMiB) + "M",
		"-smp", strconv.Itoa(o.CPUs),
		"-kernel", o.Kernel,
		"-append", o.Cmdline,
		"-nodefaults", "-no-user-config", "-nographic",
		"-serial", "stdio",
		"-no-reboot",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=4",
	}
}

// Run boots the guest under QEMU and waits for it to exit. It returns the
// guest's exit status as written to isa-debug-exit.
func Run(ctx context.Context, o Options) (int, error) {
	cmd := exec.CommandContext(ctx, Binary, Args(o)...)
	cmd.Stdout = o.Console
	cmd.Stderr = o.Console
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ctx.Err() == nil {
		code := ee.ExitCode()
		if code%2 == 1 {
			return code / 2, nil // isa-debug-exit: (status << 1) | 1
		}
		return -1, fmt.Errorf("qemu exited with status %d", code)
	}
	if err != nil {
		return -1, fmt.Errorf("running qemu: %w", err)
	}
	return -1, errors.New("qemu exited without the guest's exit status")
}
