package qemu

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// TestTestGuestBootsOnQEMU boots the very image ferry runs on QEMU's
// microvm and checks the guest's own report: both workloads that the
// benchmarks compare run and verify clean.
func TestTestGuestBootsOnQEMU(t *testing.T) {
	testguest.RequireKVM(t)
	if err := Available(); err != nil {
		t.Skipf("skipping: %v (.ci/run installs qemu-system-x86)", err)
	}
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"verify", "dirty rate=50M"} {
		t.Run(strings.Fields(w)[0], func(t *testing.T) {
			var out testguest.Console
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			status, err := Run(ctx, Options{Kernel: img, Cmdline: "workload=" + w + " size=32M exit_after=2s", MemMiB: 256, CPUs: 2, Console: &out})
			text := out.String()
			if err != nil {
				t.Fatalf("%v\n%s", err, text)
			}
			lines, _ := guestlog.ParseAll(strings.NewReader(text))
			sum := guestlog.Summarize(lines)
			if status != 0 || sum.Healthy() != nil || sum.CPUs != 2 || !sum.Exited {
				t.Fatalf("status %d, health %v, cpus %d\n%s", status, sum.Healthy(), sum.CPUs, text)
			}
			t.Logf("QEMU guest: %d heartbeats, exit status %d", sum.Heartbeats, status)
		})
	}
}
