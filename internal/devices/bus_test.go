package devices

import (
	"fmt"
	"sync"
	"testing"
)

// recorder is a Device that logs accesses.
type recorder struct {
	mu   sync.Mutex
	log  []string
	fill byte
}

func (r *recorder) Read(offset uint64, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, fmt.Sprintf("r %#x/%d", offset, len(data)))
	for i := range data {
		data[i] = r.fill
	}
}

func (r *recorder) Write(offset uint64, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, fmt.Sprintf("w %#x/%d", offset, len(data)))
}

func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.log
	r.log = nil
	return l
}

func TestBusRegisterOverlap(t *testing.T) {
	for _, tc := range []struct {
		name       string
		base, size uint64
		ok         bool
	}{
		{"just below", 0x3f0, 8, true},
		{"just above", 0x400, 1, true},
		{"same range", 0x3f8, 8, false},
		{"inside", 0x3fa, 2, false},
		{"covers", 0x3f0, 0x20, false},
		{"overlaps start", 0x3f0, 9, false},
		{"overlaps end", 0x3ff, 2, false},
		{"empty", 0x500, 0, false},
		{"wraps", ^uint64(0), 2, false},
		{"ends at the top", ^uint64(0) - 1, 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b Bus
			if err := b.Register("com1", 0x3f8, 8, &recorder{}); err != nil {
				t.Fatal(err)
			}
			err := b.Register("new", tc.base, tc.size, &recorder{})
			if (err == nil) != tc.ok {
				t.Errorf("Register(%#x, %#x) error %v, want ok=%v", tc.base, tc.size, err, tc.ok)
			}
		})
	}
	var b Bus
	if err := b.Register("nil", 0, 1, nil); err == nil {
		t.Error("registered a nil device")
	}
}

func TestBusDispatch(t *testing.T) {
	var b Bus
	devs := map[string]*recorder{"c": {fill: 0xcc}, "a": {fill: 0xaa}, "b": {fill: 0xbb}}
	// Registered out of order.
	for _, r := range []struct {
		name       string
		base, size uint64
	}{{"c", 0x510, 4}, {"a", 0x70, 2}, {"b", 0x3f8, 8}} {
		if err := b.Register(r.name, r.base, r.size, devs[r.name]); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		addr  uint64
		width int
		dev   string // "" for unclaimed
		entry string
	}{
		{0x70, 1, "a", "0x0/1"},
		{0x71, 1, "a", "0x1/1"},
		{0x72, 1, "", ""},
		{0x6f, 1, "", ""},
		{0x3f8, 1, "b", "0x0/1"},
		{0x3fd, 1, "b", "0x5/1"},
		{0x3ff, 1, "b", "0x7/1"},
		{0x400, 1, "", ""},
		{0x510, 4, "c", "0x0/4"},
		{0x512, 2, "c", "0x2/2"},
		{0x514, 4, "", ""},
		{0, 8, "", ""},
		{^uint64(0), 1, "", ""},
	} {
		for _, write := range []bool{false, true} {
			name := fmt.Sprintf("%#x/%d write=%v", tc.addr, tc.width, write)
			before := b.UnclaimedAccesses()
			data := make([]byte, tc.width)
			if write {
				b.Write(tc.addr, data)
			} else {
				b.Read(tc.addr, data)
			}
			for n, d := range devs {
				log := d.take()
				if n != tc.dev {
					if len(log) != 0 {
						t.Errorf("%s: device %s saw %v", name, n, log)
					}
					continue
				}
				op := "r "
				if write {
					op = "w "
				}
				if len(log) != 1 || log[0] != op+tc.entry {
					t.Errorf("%s: device %s saw %v, want [%s]", name, n, log, op+tc.entry)
				}
			}
			unclaimed := b.UnclaimedAccesses() - before
			if tc.dev == "" {
				if unclaimed != 1 {
					t.Errorf("%s: Unclaimed went up by %d", name, unclaimed)
				}
				if !write {
					for i, v := range data {
						if v != 0xff {
							t.Errorf("%s: unclaimed read byte %d = %#x", name, i, v)
						}
					}
				}
			} else if unclaimed != 0 {
				t.Errorf("%s: counted as unclaimed", name)
			} else if !write && data[0] != devs[tc.dev].fill {
				t.Errorf("%s: read %#x", name, data[0])
			}
		}
	}
}

// Registration while vCPUs access the bus (run with -race).
func TestBusConcurrent(t *testing.T) {
	var b Bus
	var wg sync.WaitGroup
	wg.Add(3)
	for g := 0; g < 2; g++ {
		go func() {
			defer wg.Done()
			var d [1]byte
			for i := 0; i < 2000; i++ {
				b.Read(uint64(i%64), d[:])
				b.Write(uint64(i%64), d[:])
				_ = b.UnclaimedAccesses()
			}
		}()
	}
	go func() {
		defer wg.Done()
		for i := uint64(0); i < 64; i += 2 {
			if err := b.Register(fmt.Sprint(i), i, 1, &recorder{}); err != nil {
				t.Error(err)
			}
		}
	}()
	wg.Wait()
	if n := b.UnclaimedAccesses(); n < 2*2000 {
		t.Errorf("only %d unclaimed accesses; odd ports are never claimed", n)
	}
}

func TestIRQFunc(t *testing.T) {
	var got []bool
	var line IRQLine = IRQFunc(func(high bool) { got = append(got, high) })
	line.SetLevel(true)
	line.SetLevel(false)
	if len(got) != 2 || !got[0] || got[1] {
		t.Errorf("IRQFunc saw %v", got)
	}
}
