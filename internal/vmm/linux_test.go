package vmm

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
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
			// With hardware virtualization the guest also gets virtio-rng:
			// Debian's kernel must find it on PCI with no arguments, bind
			// virtio_pci and virtio_rng (loaded by the initrd), and read
			// entropy from it.
			vm, err := New(Config{MemSize: 512 << 20, CPUs: 2, Kernel: kernel, Initrd: initrd,
				Cmdline: "console=ttyS0 earlyprintk=serial panic=-1 reboot=k", Console: &out, RNG: hw})
			if err != nil {
				t.Fatal(err)
			}
			defer vm.Close()
			want, timeout := "ferry-linux: init started", 180*time.Second
			switch {
			case hw:
				want = "ferry-linux: done, rebooting" // after the hwrng line, whole
				t.Logf("checked: hardware virtualization present, waiting for init, the virtio entropy device and %q", want)
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
			if hw {
				checkVirtioRNG(t, out.String())
			}
		})
	}
}

// checkVirtioRNG checks what the Linux guest's init reported of the
// virtio entropy device: found on PCI (vendor 0x1af4, modern device ID
// 0x1044), bound by virtio-pci, and read through /dev/hwrng.
func checkVirtioRNG(t *testing.T, con string) {
	t.Helper()
	var pciLine, rngLine string
	for _, l := range strings.Split(con, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "ferry-linux: pci ") && strings.Contains(l, "0x1af4:0x1044"):
			pciLine = l
		case strings.HasPrefix(l, "ferry-linux: hwrng="):
			rngLine = l
		}
	}
	if !strings.Contains(pciLine, "driver=virtio-pci") {
		t.Fatalf("virtio-rng not bound by virtio-pci: %q\n%s", pciLine, con)
	}
	if rngLine != "ferry-linux: hwrng=virtio_rng.0 read=4096" {
		t.Fatalf("hwrng: %q, want virtio_rng.0 with 4096 bytes read\n%s", rngLine, con)
	}
	t.Logf("console: %s; %s", pciLine, rngLine)
}

// TestLinuxRNGRestore: a Linux guest reading its virtio entropy device is
// captured mid-use and restored into a new VM, which must hold the same
// PCI and virtio state (queues, indices, MSI-X table) and go on: the
// guest's next reads of /dev/hwrng complete with 4096 bytes. Needs
// hardware virtualization (the lab): under PVM, Linux does not reach its
// init.
func TestLinuxRNGRestore(t *testing.T) {
	testguest.RequireKVM(t)
	if !testguest.HardwareVirtualization() {
		t.Skip("skipping: a stock Linux guest reaches its init only with hardware virtualization (VMX/SVM); this host's KVM is PVM")
	}
	lg, err := testguest.Linux()
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := os.ReadFile(lg.VMLinux)
	if err != nil {
		t.Fatal(err)
	}
	initrd, err := os.ReadFile(lg.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	var out testguest.Console
	src, err := New(Config{MemSize: 512 << 20, CPUs: 2, Kernel: kernel, Initrd: initrd, RNG: true, Console: &out,
		Cmdline: "console=ttyS0 panic=-1 reboot=k ferry.hwrng_rounds=60"})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if !waitForConsole(t, src, &out, "ferry-linux: hwrng round=2 ", 180*time.Second) {
		t.Fatalf("the guest did not read its hwrng twice:\n%s", out.String())
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	m, err := src.Capture()
	if err != nil {
		t.Fatal(err)
	}
	if m.PCI == nil || len(m.PCI.Virtio) != 1 || m.PCI.Virtio[0].State.Status&0x4 == 0 {
		t.Fatalf("captured PCI state lacks a driven virtio-rng: %+v", m.PCI)
	}
	before := strings.Count(out.String(), "ferry-linux: hwrng round=")
	var out2 testguest.Console
	dst, err := NewForRestore(m.Header, Config{Console: &out2})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	copy(dst.Memory().Bytes(), src.Memory().Bytes())
	src.Stop()
	if err := dst.Restore(m); err != nil {
		t.Fatal(err)
	}
	again, err := dst.Capture()
	if err != nil {
		t.Fatal(err)
	}
	if d := state.Diff(&state.Machine{PCI: m.PCI}, &state.Machine{PCI: again.PCI}, false); len(d) > 0 {
		t.Fatalf("restored PCI state differs: %v", d)
	}
	if !waitForConsole(t, dst, &out2, "ferry-linux: hwrng round=", 60*time.Second) {
		_ = dst.Pause()
		t.Fatalf("the restored guest read nothing more from its hwrng (%d rounds before):\n%s\n%s", before, dst.Diagnose(), out2.String())
	}
	deadline := time.Now().Add(60 * time.Second)
	for strings.Count(out2.String(), "ferry-linux: hwrng round=") < 3 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	lines := strings.Split(out2.String(), "\n")
	for _, l := range lines[:len(lines)-1] { // whole lines: the last may be still coming
		if strings.HasPrefix(l, "ferry-linux: hwrng round=") && !strings.HasSuffix(strings.TrimSpace(l), " read=4096") {
			t.Fatalf("a read after the restore came short: %q", l)
		}
	}
	if n := strings.Count(out2.String(), "ferry-linux: hwrng round="); n < 3 {
		t.Fatalf("only %d reads after the restore in 60 s:\n%s", n, out2.String())
	}
	t.Logf("virtio-rng restored mid-use: %d reads before the capture, %d after, each 4096 bytes", before, strings.Count(out2.String(), "ferry-linux: hwrng round="))
}
