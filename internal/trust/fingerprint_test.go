package trust

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
)

func TestFingerprintFormat(t *testing.T) {
	// SHA-256 of the empty string, as OpenSSH would print it.
	if got, want := FingerprintSPKI(nil), "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"; got != want {
		t.Errorf("FingerprintSPKI(nil) = %s, want %s", got, want)
	}
}

func TestParseFingerprint(t *testing.T) {
	good := FingerprintSPKI([]byte("spki"))
	if got, err := ParseFingerprint("  " + good + "\n"); err != nil || got != good {
		t.Errorf("ParseFingerprint(padded with spaces) = %q, %v", got, err)
	}
	sum := sha256.Sum256([]byte("spki"))
	body := good[len(FingerprintPrefix):]
	// Same 43 characters but the last one carries non-zero trailing bits.
	last := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", body[42])
	noncanon := FingerprintPrefix + body[:42] + string("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[last|1])
	bad := map[string]string{
		"":                                     "empty",
		body:                                   `does not start with "SHA256:"`,
		"sha256:" + body:                       "prefix must be exactly",
		"MD5:" + body:                          "does not start with",
		hex.EncodeToString(sum[:]):             "looks like hex",
		"SHA256:" + hex.EncodeToString(sum[:]): "digest is hex",
		"SHA256:" + body + "=":                 "must not be padded",
		"SHA256:" + body[:42]:                  "has 42 characters, want 43",
		"SHA256:" + body + "A":                 "has 44 characters",
		"SHA256:" + strings.Repeat("-", 43):    "invalid base64",
		noncanon:                               "invalid base64",
	}
	for in, want := range bad {
		got, err := ParseFingerprint(in)
		if err == nil {
			t.Errorf("ParseFingerprint(%q) = %q, want an error", in, got)
		} else if !strings.Contains(err.Error(), want) {
			t.Errorf("ParseFingerprint(%q): %v, want it to mention %q", in, err, want)
		}
	}
}

func FuzzParseFingerprint(f *testing.F) {
	f.Add(FingerprintSPKI(nil))
	f.Add(FingerprintSPKI([]byte("x")))
	f.Add("SHA256:")
	f.Add("sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU")
	f.Add("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV")
	f.Add("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
	f.Add("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseFingerprint(s)
		if err != nil {
			if got != "" {
				t.Fatalf("error %v with result %q", err, got)
			}
			return
		}
		body, ok := strings.CutPrefix(got, FingerprintPrefix)
		if !ok {
			t.Fatalf("%q: result %q lacks the prefix", s, got)
		}
		raw, err := base64.RawStdEncoding.DecodeString(body)
		if err != nil || len(raw) != sha256.Size {
			t.Fatalf("%q: result %q does not hold a SHA-256 digest (%v)", s, got, err)
		}
		// Exactly one spelling per digest: re-encoding gives the result back.
		if again := FingerprintPrefix + base64.RawStdEncoding.EncodeToString(raw); again != got {
			t.Fatalf("%q: result %q is not canonical (%q)", s, got, again)
		}
		if got != strings.TrimSpace(s) {
			t.Fatalf("%q: result %q is not the trimmed input", s, got)
		}
		if again, err := ParseFingerprint(got); err != nil || again != got {
			t.Fatalf("re-parse %q = %q, %v", got, again, err)
		}
	})
}
