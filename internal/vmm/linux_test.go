package vmm

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/testguest"
)

// waitForConsole runs vm until the console shows want or the timeout.
func waitForConsole(t *testing.T, vm *VM, out *testguest.Console, want string, timeout time.Duration) bool {
	t.Helper()
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(out.String(), want) {
			return true
		}
		select {
		case <-vm.Done():
			return strings.Contains(out.String(), want)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return false
}

// TestBootLinux boots the stock Debian cloud kernel. With hardware
// virtualization it must reach the initramfs' first line; under PVM, where
// kernel code is emulated, it checks the kernel banner and stops there.
func TestBootLinux(t *testing.T) {
	testguest.RequireKVM(t)
	lg, err := testguest.Linux()
	if err != nil {
		t.Fatal(err)
	}
	hw := testguest.HardwareVirtualization()
	for _, tc := range []struct {
		name, kernel string
	}{
		{"pvh-vmlinux", lg.VMLinux},
		{"bzimage", lg.VMLinuz},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kernel, err := os.ReadFile(tc.kernel)
			if err != nil {
				t.Fatal(err)
			}
			initrd, err := os.ReadFile(lg.Initrd)
			if err != nil {
				t.Fatal(err)
			}
			var out testguest.Console
			vm, err := New(Config{MemSize: 512 << 20, CPUs: 2, Kernel: kernel, Initrd: initrd,
				Cmdline: "console=ttyS0 earlyprintk=serial panic=-1 reboot=k", Console: &out})
			if err != nil {
				t.Fatal(err)
			}
			defer vm.Close()
			want, timeout := "ferry-linux: init started", 180*time.Second
			switch {
			case hw:
				t.Logf("checked: hardware virtualization present, waiting for %q", want)
			case tc.name == "bzimage":
				// The bzImage decompressor runs at CPL 0, which PVM emulates
				// at ~1.5 M instructions/s: minutes of work. Check only that
				// it loads and starts without a broken-guest exit.
				t.Logf("checked: PVM host (no vmx/svm); bzImage loaded and ran 2 s without failing")
				if err := vm.Start(); err != nil {
					t.Fatal(err)
				}
				select {
				case <-vm.Done():
					_, err := vm.Wait()
					t.Fatalf("bzImage guest ended early: %v\n%s", err, out.String())
				case <-time.After(2 * time.Second):
				}
				return
			default:
				want = "Linux version"
				t.Logf("checked: PVM host (no vmx/svm), kernel code is emulated; waiting for the banner %q", want)
			}
			ok := waitForConsole(t, vm, &out, want, timeout)
			if !ok {
				testguest.FreezeKernelTrace()
				t.Logf("the guest's vCPUs when the wait ended:\n%s", vm.Diagnose())
			}
			vm.Stop()
			_, runErr := vm.Wait()
			if !ok {
				t.Fatalf("%q not seen on the console (VM error: %v); console:\n%s", want, runErr, out.String())
			}
			first, _, _ := strings.Cut(out.String()[strings.Index(out.String(), want):], "\n")
			t.Logf("console: %s", first)
		})
	}
}
