package lab

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/testguest"
)

// The lab's own tests boot emulated hosts: they need qemu-system-x86_64
// (make test installs it), not /dev/kvm. FERRY_LAB=0 skips them.

var (
	ferryOnce sync.Once
	ferryBin  string
	ferryErr  error
)

// staticFerry builds a static ferry for the hosts once per test binary.
func staticFerry(t *testing.T) string {
	t.Helper()
	ferryOnce.Do(func() {
		if p := os.Getenv("FERRY_LAB_FERRY"); p != "" {
			ferryBin = p
			return
		}
		root := testguest.RepoRoot()
		out := filepath.Join(root, "build", "lab", "ferry-test")
		cmd := exec.Command("go", "build", "-o", out, "./cmd/ferry")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			ferryErr = err
			ferryBin = string(b)
			return
		}
		ferryBin = out
	})
	if ferryErr != nil {
		t.Fatalf("building a static ferry: %v\n%s", ferryErr, ferryBin)
	}
	return ferryBin
}

// requireLab skips when the lab cannot run here, and otherwise marks the
// test as a lab test for the summary of make test.
func requireLab(t *testing.T) {
	t.Helper()
	if os.Getenv("FERRY_LAB") == "0" {
		t.Skip("skipping: lab test, FERRY_LAB=0")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: lab test needs qemu-system-x86_64 (make test installs it)")
	}
	t.Logf("LAB-TEST-RAN %s", t.Name())
}

// startLab starts a lab for t with the guests and images of this tree,
// and stops it (with consoles and daemon logs in the log on failure)
// when t ends.
func startLab(t *testing.T, cfg Config) *Lab {
	t.Helper()
	requireLab(t)
	root := testguest.RepoRoot()
	cmd := exec.Command(filepath.Join(root, "scripts", "lab-host.sh"), filepath.Join(root, "build", "lab"))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("scripts/lab-host.sh: %v\n%s", err, b)
	}
	guest, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	lg, err := testguest.Linux()
	if err != nil {
		t.Fatal(err)
	}
	cfg.ImageDir = filepath.Join(root, "build", "lab")
	cfg.Ferry = staticFerry(t)
	cfg.Guest, cfg.Linux, cfg.Initrd = guest, lg.VMLinuz, lg.Initrd
	cfg.Dir = t.TempDir()
	cfg.Log = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			for _, h := range l.Hosts {
				if h.Alive() {
					t.Logf("--- %s daemon log ---\n%s", h.Name, tail([]byte(h.DaemonLog(dctx)), 4000))
				}
			}
			cancel()
			t.Log(l.Consoles())
		}
		l.Close()
	})
	return l
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func TestLastHWRNGRound(t *testing.T) {
	for _, c := range []struct {
		con   string
		round int
		full  bool
	}{
		{"", 0, false},
		{"ferry-linux: hwrng round=1 read=4096\nferry-linux: hwrng round=2 read=4096\n", 2, true},
		{"ferry-linux: hwrng round=1 read=4096\nferry-check: beat\nferry-linux: hwrng round=2 read=12\n", 2, false},
		{"ferry-linux: hwrng round=3 read=4096\nferry-linux: hwrng round=4 read=", 3, true}, // round 4 still coming
	} {
		round, full := LastHWRNGRound(c.con)
		if round != c.round || full != c.full {
			t.Errorf("LastHWRNGRound(%q) = %d, %v; want %d, %v", c.con, round, full, c.round, c.full)
		}
	}
}
