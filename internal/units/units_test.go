package units

import "testing"

func TestParseBytes(t *testing.T) {
	good := map[string]uint64{"4096": 4096, "64K": 64 << 10, "512M": 512 << 20, "1G": 1 << 30, "2GiB": 2 << 30, "3MB": 3 << 20, "1t": 1 << 40}
	for in, want := range good {
		got, err := ParseBytes(in)
		if err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "12X", "-1", "99999999999999999999", "20000000T"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) accepted", in)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{12: "12 B", 1536: "1.5 KiB", 512 << 20: "512.0 MiB", 3 << 30: "3.0 GiB"} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
