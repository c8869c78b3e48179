package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ferry-vmm/ferry/internal/qemu"
)

// qemuSystem runs the same guest on QEMU (microvm, KVM) in each namespace
// and drives QEMU's own migration over QMP, the way a management layer
// does: the destination QEMU is started with -incoming as part of the
// migration, so its start-up counts into the total time as ferry's
// destination VMM start does.
type qemuSystem struct {
	lab   *Lab
	guest string
	dir   string
}

func newQEMUSystem(lab *Lab, guest, dir string) *qemuSystem {
	return &qemuSystem{lab: lab, guest: guest, dir: dir}
}

func (q *qemuSystem) Name() string { return "qemu" }

func (q *qemuSystem) Start(ctx context.Context) error {
	if err := qemu.Available(); err != nil {
		return fmt.Errorf("%w: %v", ErrNoQEMU, err)
	}
	return nil
}

func (q *qemuSystem) Close() {}

func (q *qemuSystem) options(s *Spec, h Host, obs *Observation) qemu.Options {
	console := obs.Src
	if h == q.lab.Dest {
		console = obs.Dst
	}
	return qemu.Options{Kernel: q.guest, Cmdline: s.Guest.Cmdline, MemMiB: s.Guest.MemMiB, CPUs: s.Guest.CPUs,
		Console: console, Wrapper: h.Wrapper()}
}

// bootSource starts the guest on the source and lets it warm up.
func (q *qemuSystem) bootSource(ctx context.Context, s *Spec, obs *Observation) (*qemu.Instance, error) {
	src, err := qemu.Start(ctx, q.options(s, q.lab.Source, obs))
	if err != nil {
		return nil, fmt.Errorf("starting QEMU on the source: %w", err)
	}
	if err := s.warmUp(ctx, obs.Src); err != nil {
		src.Close()
		return nil, err
	}
	return src, nil
}

// qemuVariants are QEMU's counterparts of ferry's optimizations: XBZRLE
// delta encoding, and multifd (parallel streams) with and without zstd.
var qemuVariants = map[string]struct {
	caps   map[string]bool
	params map[string]any
}{
	"":              {},
	"none":          {},
	"xbzrle":        {caps: map[string]bool{"xbzrle": true}, params: map[string]any{"xbzrle-cache-size": 64 << 20}},
	"multifd4":      {caps: map[string]bool{"multifd": true}, params: map[string]any{"multifd-channels": 4}},
	"multifd4-zstd": {caps: map[string]bool{"multifd": true}, params: map[string]any{"multifd-channels": 4, "multifd-compression": "zstd"}},
}

var techniques = map[string]qemu.Technique{"precopy": qemu.Precopy, "postcopy": qemu.Postcopy, "hybrid": qemu.Hybrid}

func (q *qemuSystem) Migrate(ctx context.Context, s *Spec, obs *Observation) error {
	tech, ok := techniques[s.Technique]
	variant, vok := qemuVariants[s.Variant]
	if !ok || !vok {
		return fmt.Errorf("qemu: no %s %s", s.Technique, s.Variant)
	}
	src, err := q.bootSource(ctx, s, obs)
	if err != nil {
		return err
	}
	defer src.Close()
	obs.Begin(ctx)
	o := q.options(s, q.lab.Dest, obs)
	o.Incoming = "defer"
	dst, err := qemu.Start(ctx, o)
	if err != nil {
		return fmt.Errorf("starting QEMU on the destination: %w", err)
	}
	defer dst.Close()
	out, err := qemu.MigrateTo(ctx, src, dst, qemu.Plan{
		URI:       fmt.Sprintf("tcp:%s:0", q.lab.Dest.IP),
		Technique: tech, PrecopyFor: s.PrecopyFor, DowntimeLimit: s.DowntimeLimit, ForceAfter: s.ForceAfter,
		Capabilities: variant.caps, Parameters: variant.params,
	})
	obs.End(ctx)
	out.SourceEvents, out.DestEvents = nil, nil
	obs.SystemReport, obs.ForcedStop = out, out.ForcedStop
	if err != nil {
		return err
	}
	return s.settle(ctx, obs.Dst)
}

// Offline saves with QEMU's migration to a file (the guest stopped first),
// carries the file over the link, and loads it into a QEMU started with
// -incoming on the destination.
func (q *qemuSystem) Offline(ctx context.Context, s *Spec, obs *Observation) error {
	if s.Variant != "raw" {
		return fmt.Errorf("qemu: no offline variant %q", s.Variant)
	}
	src, err := q.bootSource(ctx, s, obs)
	if err != nil {
		return err
	}
	defer src.Close()
	name := s.vmName()
	saved := filepath.Join(q.dir, name+".src.qemu")
	moved := filepath.Join(q.dir, name+".dst.qemu")
	defer os.Remove(saved)
	defer os.Remove(moved)
	off := &Offline{}
	obs.Offline = off
	obs.Begin(ctx)
	t0 := time.Now()
	out, err := qemu.MigrateTo(ctx, src, nil, qemu.Plan{URI: "exec:cat > " + saved, Technique: qemu.Offline})
	off.SaveTime = time.Since(t0)
	out.SourceEvents = nil
	obs.SystemReport = out
	if err != nil {
		return fmt.Errorf("saving: %w", err)
	}
	if off.StateBytes, off.TransferTime, err = carry(ctx, q.lab, saved, moved); err != nil {
		return err
	}
	t1 := time.Now()
	o := q.options(s, q.lab.Dest, obs)
	o.Incoming = "defer"
	dst, err := qemu.Start(ctx, o)
	if err != nil {
		return fmt.Errorf("starting QEMU on the destination: %w", err)
	}
	defer dst.Close()
	if err := loadAndRun(ctx, dst, "exec:cat "+moved); err != nil {
		return err
	}
	if err := WaitBeats(ctx, obs.Dst, 1, "restored guest"); err != nil {
		return err
	}
	off.RestoreTime = time.Since(t1)
	obs.End(ctx)
	return s.settle(ctx, obs.Dst)
}

// loadAndRun loads a saved state into a QEMU waiting with -incoming defer
// and continues the guest (it was stopped when saved).
func loadAndRun(ctx context.Context, dst *qemu.Instance, uri string) error {
	c := dst.QMP()
	if err := c.MigrateIncoming(ctx, uri); err != nil {
		return fmt.Errorf("loading the state: %w", err)
	}
	deadline, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		st, err := c.QueryStatus(deadline)
		if err != nil {
			return fmt.Errorf("loading the state: %w", err)
		}
		if st.Running {
			return nil
		}
		info, err := c.QueryMigrate(deadline)
		if err != nil {
			return fmt.Errorf("loading the state: %w", err)
		}
		switch {
		case info.Status == qemu.StatusFailed:
			return fmt.Errorf("loading the state: %s", info.ErrorDesc)
		case info.Status == qemu.StatusCompleted && st.Status == "paused":
			if err := c.Cont(deadline); err != nil {
				return fmt.Errorf("continuing the loaded guest: %w", err)
			}
		}
		select {
		case <-deadline.Done():
			return errors.New("loading the state: the guest did not start within 5 minutes")
		case <-time.After(10 * time.Millisecond):
		}
	}
}
