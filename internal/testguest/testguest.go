// Package testguest gives tests the bundled test guest (built from guest/
// with make on first use) and the KVM gate: tests that need /dev/kvm call
// RequireKVM, which skips with the reason where KVM is absent and counts
// the tests that did run, for .ci/run's report.
//
// It is used only by tests and the benchmark harness; it must not be
// imported by production packages.
package testguest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// RepoRoot is the repository's top directory, found from this file's path.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var (
	buildOnce sync.Once
	buildErr  error
	imagePath string
)

// Build makes the guest image (make -C guest) and returns its path. With
// $FERRY_TEST_GUEST set it uses that prebuilt image instead (test binaries
// run inside the lab's hosts, which have no compiler).
func Build() (string, error) {
	buildOnce.Do(func() {
		if p := os.Getenv("FERRY_TEST_GUEST"); p != "" {
			imagePath = p
			return
		}
		root := RepoRoot()
		cmd := exec.Command("make", "-s", "-C", filepath.Join(root, "guest"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("building the test guest: %v\n%s", err, out)
			return
		}
		imagePath = filepath.Join(root, "build", "guest", "ferry-guest.elf")
	})
	return imagePath, buildErr
}

// Image returns the guest image bytes, failing the test if it cannot be
// built.
func Image(t testing.TB) []byte {
	t.Helper()
	p, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// RequireKVM skips the test when /dev/kvm cannot be used, and otherwise
// records that a KVM test ran: it prints a "KVM-TEST-RAN" marker that
// make test's summary counts (scripts/testsummary), on this machine or,
// when the test binary runs inside a lab host, in the lab.
func RequireKVM(t testing.TB) {
	t.Helper()
	if err := kvm.Available(); err != nil {
		t.Skipf("skipping: needs /dev/kvm: %v", err)
	}
	t.Logf("KVM-TEST-RAN %s", t.Name())
}

// LinuxGuest is the Debian kernel and initramfs prepared by
// scripts/linux-guest.sh (make linux-guest).
type LinuxGuest struct {
	VMLinux string // uncompressed ELF with PVH note
	VMLinuz string // bzImage
	Initrd  string
}

var (
	linuxOnce sync.Once
	linuxErr  error
	linux     LinuxGuest
)

// Linux prepares (downloads on first use) and returns the Linux guest.
// With $FERRY_TEST_LINUX_DIR set it takes the prepared files from there.
func Linux() (LinuxGuest, error) {
	linuxOnce.Do(func() {
		if d := os.Getenv("FERRY_TEST_LINUX_DIR"); d != "" {
			linux = LinuxGuest{VMLinux: filepath.Join(d, "vmlinux"), VMLinuz: filepath.Join(d, "vmlinuz"), Initrd: filepath.Join(d, "initrd.cpio.gz")}
			return
		}
		root := RepoRoot()
		out := filepath.Join(root, "build", "linux")
		cmd := exec.Command(filepath.Join(root, "scripts", "linux-guest.sh"), out)
		if b, err := cmd.CombinedOutput(); err != nil {
			linuxErr = fmt.Errorf("preparing the Linux guest (scripts/linux-guest.sh): %v\n%s", err, b)
			return
		}
		linux = LinuxGuest{
			VMLinux: filepath.Join(out, "vmlinux"),
			VMLinuz: filepath.Join(out, "vmlinuz"),
			Initrd:  filepath.Join(out, "initrd.cpio.gz"),
		}
	})
	return linux, linuxErr
}

// HardwareVirtualization reports whether the host CPU advertises VMX or
// SVM. Without them (PVM), guest kernel code is emulated and slow.
func HardwareVirtualization() bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, f := range strings.Fields(string(b)) {
		if f == "vmx" || f == "svm" {
			return true
		}
	}
	return false
}

// FreezeKernelTrace stops the host kernel's trace ring at the moment a test
// sees its guest fail, so that the events leading to the failure are not
// overwritten while the test tears down. It acts only when the lab's test
// runner turned tracing on (scripts/kvm-in-lab -ktrace sets FERRY_KTRACE).
func FreezeKernelTrace() {
	if os.Getenv("FERRY_KTRACE") == "" {
		return
	}
	_ = os.WriteFile("/sys/kernel/tracing/tracing_on", []byte("0\n"), 0)
}
