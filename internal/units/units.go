// Package units parses and formats the byte sizes and rates users type on
// the command line ("512M", "1G", "1Gbit"). It depends on nothing.
package units

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseBytes parses a size such as "4096", "64K", "512M", "1G", "2T",
// "512MiB" or "1GB". Suffixes are powers of 1024 (memory sizes).
func ParseBytes(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9') {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q does not start with a number", s)
	}
	n, err := strconv.ParseUint(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	var shift uint
	switch strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(t[i:], "iB"), "B")) {
	case "":
		shift = 0
	case "K":
		shift = 10
	case "M":
		shift = 20
	case "G":
		shift = 30
	case "T":
		shift = 40
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q (use K, M, G or T)", s, t[i:])
	}
	if n > (^uint64(0))>>shift {
		return 0, fmt.Errorf("size %q overflows", s)
	}
	return n << shift, nil
}

// FormatBytes renders n with a binary unit ("1.5 GiB").
func FormatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// ParseRate reads a rate per second: bits ("1Gbit", "500Mbit", "64Kbit")
// or bytes as ParseBytes reads them ("100MB", "100M"). It returns bytes
// per second; "" is 0 (no rate).
func ParseRate(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}} {
		if len(s) > len(u.suffix) && strings.EqualFold(s[len(s)-len(u.suffix):], u.suffix) {
			n, err := strconv.ParseInt(s[:len(s)-len(u.suffix)], 10, 64)
			if err != nil || n <= 0 {
				return 0, fmt.Errorf("rate %q: bad number", s)
			}
			return n * u.mult, nil
		}
	}
	n, err := ParseBytes(s)
	if err != nil {
		return 0, fmt.Errorf("rate %q: use e.g. 1Gbit, 500Mbit or 100MB: %w", s, err)
	}
	return int64(n), nil
}
