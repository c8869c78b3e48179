package trust

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// FingerprintPrefix starts every fingerprint.
const FingerprintPrefix = "SHA256:"

// fingerprintLen is the length of the base64 part of a fingerprint: 32
// bytes of SHA-256 in unpadded base64.
var fingerprintLen = base64.RawStdEncoding.EncodedLen(sha256.Size)

// fpEncoding rejects non-canonical trailing bits so that a fingerprint has
// exactly one spelling and can be compared as a string.
var fpEncoding = base64.RawStdEncoding.Strict()

// FingerprintSPKI returns the fingerprint of a DER-encoded
// SubjectPublicKeyInfo: "SHA256:" followed by the SHA-256 of the DER in
// standard base64 without padding (the format OpenSSH prints), e.g.
// "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".
func FingerprintSPKI(spki []byte) string {
	sum := sha256.Sum256(spki)
	return FingerprintPrefix + fpEncoding.EncodeToString(sum[:])
}

// CertFingerprint returns the fingerprint of cert's public key (its
// SubjectPublicKeyInfo, not the whole certificate: a certificate re-issued
// for the same key keeps its fingerprint).
func CertFingerprint(cert *x509.Certificate) string {
	return FingerprintSPKI(cert.RawSubjectPublicKeyInfo)
}

// ParseFingerprint checks that s is a fingerprint in the format
// CertFingerprint produces and returns it in canonical form (surrounding
// white space removed). Anything else is rejected with an error that says
// what is wrong.
func ParseFingerprint(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("trust: empty fingerprint")
	}
	body, ok := strings.CutPrefix(s, FingerprintPrefix)
	if !ok {
		if p, _, found := strings.Cut(s, ":"); found && strings.EqualFold(p+":", FingerprintPrefix) {
			return "", fmt.Errorf("trust: fingerprint %q: prefix must be exactly %q", s, FingerprintPrefix)
		}
		if isHexDigest(s) {
			return "", fmt.Errorf("trust: fingerprint %q looks like hex; ferry fingerprints are %q followed by unpadded base64 (as printed by the daemon)", s, FingerprintPrefix)
		}
		return "", fmt.Errorf("trust: fingerprint %q does not start with %q", s, FingerprintPrefix)
	}
	if isHexDigest(body) {
		return "", fmt.Errorf("trust: fingerprint %q: digest is hex; ferry fingerprints use unpadded base64 after %q (as printed by the daemon)", s, FingerprintPrefix)
	}
	if strings.HasSuffix(body, "=") {
		return "", fmt.Errorf("trust: fingerprint %q: base64 part must not be padded with '='", s)
	}
	if len(body) != fingerprintLen {
		return "", fmt.Errorf("trust: fingerprint %q: base64 part has %d characters, want %d", s, len(body), fingerprintLen)
	}
	if _, err := fpEncoding.DecodeString(body); err != nil {
		return "", fmt.Errorf("trust: fingerprint %q: invalid base64: %v", s, err)
	}
	return s, nil
}

// isHexDigest reports whether s looks like a hex SHA-256 digest, with or
// without colons.
func isHexDigest(s string) bool {
	s = strings.ReplaceAll(s, ":", "")
	if len(s) != 2*sha256.Size {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}
