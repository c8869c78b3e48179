package vmm

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/testguest"
)

func TestBootTestGuest(t *testing.T) {
	testguest.RequireKVM(t)
	img := testguest.Image(t)
	var out testguest.Console
	vm, err := New(Config{MemSize: 256 << 20, CPUs: 2, Kernel: img, Cmdline: "workload=dirty size=64M exit_after=2s", Console: &out})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	exit, err := vm.Run(ctx)
	t.Logf("console:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	if exit.Reason != ExitGuest || exit.Status != 0 {
		t.Fatalf("exit %+v", exit)
	}
	if !strings.Contains(out.String(), "ferry-guest: boot") {
		t.Fatal("no boot line")
	}
}

func TestVerifyWithPauses(t *testing.T) {
	testguest.RequireKVM(t)
	img := testguest.Image(t)
	var out testguest.Console
	vm, err := New(Config{MemSize: 256 << 20, CPUs: 2, Kernel: img, Cmdline: "workload=verify size=64M exit_after=3s", Console: &out})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	pauses := 0
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); pauses++ {
		time.Sleep(20 * time.Millisecond)
		if err := vm.Pause(); err != nil {
			break
		}
		if !vm.Paused() {
			t.Fatal("Pause returned but VM not paused")
		}
		time.Sleep(5 * time.Millisecond)
		vm.Resume()
	}
	exit, err := vm.Wait()
	t.Logf("%d pauses; console:\n%s", pauses, out.String())
	if err != nil {
		t.Fatal(err)
	}
	if exit.Reason != ExitGuest || exit.Status != 0 {
		t.Fatalf("exit %+v", exit)
	}
}
