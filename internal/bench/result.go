package bench

import "time"

// ResultVersion is the version of the Result JSON. Readers refuse other
// versions; fields may be added within a version.
const ResultVersion = 1

// Result is one benchmark run: one system moving one guest with one
// technique over the shaped link. Every number is measured the same way
// for every system: times by the harness's clock, downtime from the
// guest's heartbeats as they arrive on the host, bytes from the veth
// counters. SystemReport is the tool's own view, kept for reference only.
type Result struct {
	Version   int    `json:"version"`
	Scenario  string `json:"scenario"`  // "dirty-rate", "working-set", "idle", "optimizations", "offline", "smoke"
	System    string `json:"system"`    // "ferry" or "qemu"
	Technique string `json:"technique"` // "precopy", "postcopy", "hybrid", "stopcopy", "offline"
	// PrecopyFor is hybrid's pre-copy phase before the switch to post-copy.
	PrecopyFor time.Duration `json:"precopy_for_ns,omitempty"`
	// Variant names an optimization set ("none", "zstd", "lz4", "delta",
	// "dedup", "streams4", "all"; QEMU: "none", "xbzrle", "multifd4",
	// "multifd4-zstd"); empty outside the optimizations scenario.
	Variant string `json:"variant,omitempty"`
	// Label is the run's name in tables: system, technique and parameters.
	Label string `json:"label"`

	Guest Guest `json:"guest"`
	Link  Link  `json:"link"`

	Started  time.Time `json:"started"`
	Finished bool      `json:"finished"`        // the guest runs on the destination
	Error    string    `json:"error,omitempty"` // why not, or what went wrong

	TotalTime time.Duration `json:"total_time_ns"` // migrate command → the destination holds everything
	// Downtime is the guest-observed downtime: the longest time between two
	// consecutive heartbeats of a CPU during the migration (source and
	// destination consoles merged by arrival time), less the heartbeat
	// interval. HeartbeatGap is the raw longest gap.
	Downtime     time.Duration `json:"downtime_ns"`
	HeartbeatGap time.Duration `json:"heartbeat_gap_ns"`
	// SwitchAt is when the guest last beat on the source, from the start of
	// the migration (0 if it never stopped there).
	SwitchAt time.Duration `json:"switch_at_ns,omitempty"`

	BytesForward uint64 `json:"bytes_forward"` // source → destination, veth tx counter
	BytesBack    uint64 `json:"bytes_back"`    // destination → source
	// ForcedStop is set when pre-copy did not converge and the harness
	// forced the switch (the seed paper's 60 s stop-and-copy).
	ForcedStop bool `json:"forced_stop,omitempty"`

	// Degradation is the application's loss during the migration:
	// 1 − (work done from migration start to end) / (the rate before
	// × the time). 0 for an idle guest. Timeline holds every heartbeat
	// from BaselineFrom on, with the workload's rate relative to before.
	Baseline    float64     `json:"baseline_pages_per_s"`
	Degradation float64     `json:"degradation"`
	Timeline    []RatePoint `json:"timeline,omitempty"`

	// GuestErrors counts FAIL and EXCEPTION lines: the guest's own checks
	// of the memory it touches after the move. Non-zero is a failed run.
	GuestErrors int `json:"guest_errors"`
	// GuestChecked counts the pages the guest verified (dirty check=1: each
	// page re-read before it is rewritten) after it last ran on the source.
	GuestChecked uint64 `json:"guest_checked_pages"`

	// Offline runs: the saved state's size and each phase.
	Offline *Offline `json:"offline,omitempty"`

	SystemReport any `json:"system_report,omitempty"`
}

// Guest is the benchmark guest.
type Guest struct {
	MemMiB     int    `json:"mem_mib"`
	CPUs       int    `json:"cpus"`
	Workload   string `json:"workload"`                    // "dirty", "idle"
	WorkingSet int64  `json:"working_set_bytes,omitempty"` // as the guest reported it (boot line)
	// WorkingSetAsked is size= when the guest used less (it clamps the
	// working set to its largest free RAM range).
	WorkingSetAsked int64  `json:"working_set_asked_bytes,omitempty"`
	DirtyRate       int64  `json:"dirty_rate,omitempty"` // bytes/s asked of the guest
	Fill            int64  `json:"fill_bytes,omitempty"`
	Content         string `json:"content,omitempty"`
	Cmdline         string `json:"cmdline"`
}

// Link is the shaped link the run crossed.
type Link struct {
	Rate    string        `json:"rate"` // "1Gbit", "10Gbit", "unlimited"
	Latency time.Duration `json:"latency_ns"`
}

// RatePoint is one heartbeat: seconds from the migration's start, and the
// rate the workload achieved over the beat relative to its baseline.
type RatePoint struct {
	T        float64 `json:"t"`
	Relative float64 `json:"relative"`
	Host     string  `json:"host"` // "source" or "destination"
}

// Offline is the save → transfer → restore sequence.
type Offline struct {
	StateBytes   uint64        `json:"state_bytes"`
	Compressed   bool          `json:"compressed"`
	SaveTime     time.Duration `json:"save_ns"`
	TransferTime time.Duration `json:"transfer_ns"`
	RestoreTime  time.Duration `json:"restore_ns"`
}

// Set is a whole benchmark invocation: the machine, the settings, every run.
type Set struct {
	Version  int       `json:"version"`
	Started  time.Time `json:"started"`
	Profile  string    `json:"profile"`
	Machine  Machine   `json:"machine"`
	Link     Link      `json:"link"`
	Results  []Result  `json:"results"`
	Duration float64   `json:"duration_s"`
}

// Machine states where the numbers come from.
type Machine struct {
	CPU       string `json:"cpu"`
	CPUs      int    `json:"cpus"`
	MemoryGiB int    `json:"memory_gib"`
	Kernel    string `json:"kernel"`
	KVM       string `json:"kvm"` // "PVM" or "VMX/SVM"
	QEMU      string `json:"qemu"`
	Ferry     string `json:"ferry"`
}
