package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Files of a host identity, relative to the data directory.
const (
	IdentityDir  = "identity"
	KeyFile      = "identity/key.pem"  // PKCS#8 "PRIVATE KEY", mode 0600
	CertFile     = "identity/cert.pem" // "CERTIFICATE"
	certValidity = 10 * 365 * 24 * time.Hour
	// renewBefore: a certificate closer than this to its expiry is
	// re-issued for the same key (and so the same fingerprint) on load.
	renewBefore = 30 * 24 * time.Hour
)

// Identity is a host's private key and its self-signed certificate. It is
// immutable and safe for concurrent use.
//
// The key is ECDSA P-256 rather than Ed25519. Both work with TLS 1.3 and
// Go, but ecdsa_secp256r1_sha256 is one of the signature algorithms every
// TLS 1.3 implementation must support (RFC 8446, section 9.1) while Ed25519
// is optional, and P-256 is what TPM 2.0 chips and PKCS#11 tokens offer
// should the host key later move into hardware. An existing Ed25519 key in
// key.pem is accepted too.
type Identity struct {
	key         crypto.Signer
	cert        *x509.Certificate
	tlsCert     tls.Certificate
	fingerprint string
}

// Fingerprint returns the identity's fingerprint (see CertFingerprint):
// "SHA256:" and the unpadded base64 SHA-256 of the certificate's
// SubjectPublicKeyInfo.
func (id *Identity) Fingerprint() string { return id.fingerprint }

// Name returns the certificate's common name: the host name at creation
// plus a random suffix. It is a label, never used for authentication.
func (id *Identity) Name() string { return id.cert.Subject.CommonName }

// Certificate returns the parsed certificate. The caller must not modify it.
func (id *Identity) Certificate() *x509.Certificate { return id.cert }

// TLSCertificate returns the certificate and key for a tls.Config.
func (id *Identity) TLSCertificate() tls.Certificate { return id.tlsCert }

// LoadOrCreate loads the identity kept under dataDir (identity/key.pem and
// identity/cert.pem), creating a new key and certificate if there is none;
// created reports that a new key was generated (the daemon should then print
// the fingerprint for the operator).
//
// If key.pem exists but cert.pem does not, or the certificate expires within
// 30 days, a new certificate is issued for the existing key; the fingerprint
// does not change. A cert.pem without key.pem, a certificate for another
// key, or a key.pem readable or writable by group or others is an error:
// nothing is overwritten.
//
// Two processes calling LoadOrCreate at once on an empty directory end up
// with the same identity: files are published with link(2), which fails if
// the name exists, and the loser loads the winner's file.
func LoadOrCreate(dataDir string) (id *Identity, created bool, err error) {
	dir := filepath.Join(dataDir, IdentityDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("trust: %w", err)
	}
	keyPath := filepath.Join(dataDir, KeyFile)
	certPath := filepath.Join(dataDir, CertFile)

	key, created, err := loadOrCreateKey(keyPath, certPath)
	if err != nil {
		return nil, false, err
	}
	cert, err := loadOrIssueCert(certPath, keyPath, key)
	if err != nil {
		return nil, false, err
	}
	id = &Identity{
		key:         key,
		cert:        cert,
		tlsCert:     tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert},
		fingerprint: CertFingerprint(cert),
	}
	return id, created, nil
}

func loadOrCreateKey(keyPath, certPath string) (crypto.Signer, bool, error) {
	for attempt := 0; ; attempt++ {
		key, err := readKey(keyPath)
		if err == nil {
			return key, false, nil
		}
		if !errors.Is(err, fs.ErrNotExist) || attempt > 0 {
			return nil, false, err
		}
		if _, err := os.Stat(certPath); err == nil {
			return nil, false, fmt.Errorf("trust: %s exists but %s does not; refusing to create a new key for an existing certificate (move %s away to start a new identity)", certPath, keyPath, certPath)
		}
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, false, fmt.Errorf("trust: generate key: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return nil, false, fmt.Errorf("trust: encode key: %w", err)
		}
		data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		err = writeFileAtomic(keyPath, data, 0o600, false)
		if err == nil {
			return k, true, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return nil, false, err
		}
		// Another process created the key first: load it.
	}
}

func readKey(path string) (crypto.Signer, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("trust: %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("trust: %s has mode %04o; a private key must not be accessible by group or others (chmod 600 it)", path, perm)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("trust: %s: no PEM \"PRIVATE KEY\" (PKCS#8) block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("trust: %s: %w", path, err)
	}
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	default:
		return nil, fmt.Errorf("trust: %s: key type %T not supported (want ECDSA or Ed25519)", path, k)
	}
}

func loadOrIssueCert(path, keyPath string, key crypto.Signer) (*x509.Certificate, error) {
	for attempt := 0; ; attempt++ {
		cert, err := readCert(path)
		switch {
		case err == nil:
			if !publicKeyEqual(cert.PublicKey, key.Public()) {
				return nil, fmt.Errorf("trust: %s is not a certificate for the key in %s", path, keyPath)
			}
			if time.Until(cert.NotAfter) > renewBefore {
				return cert, nil
			}
			// Renew for the same key and name; replace the old file.
			return issueCert(path, key, cert.Subject.CommonName, true)
		case errors.Is(err, fs.ErrNotExist) && attempt == 0:
			name, err := newCommonName()
			if err != nil {
				return nil, err
			}
			cert, err := issueCert(path, key, name, false)
			if errors.Is(err, fs.ErrExist) {
				continue // another process issued one first: load it
			}
			return cert, err
		default:
			return nil, err
		}
	}
}

func readCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("trust: %s: no PEM \"CERTIFICATE\" block", path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("trust: %s: %w", path, err)
	}
	return cert, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// newCommonName returns the host name plus a random suffix, so that two
// hosts installed from one image, or one host re-installed, have distinct
// names.
func newCommonName() (string, error) {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "ferry"
	}
	host, _, _ = strings.Cut(host, ".")
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("trust: %w", err)
	}
	return host + "-" + hex.EncodeToString(b[:]), nil
}

// issueCert creates a self-signed certificate for key and writes it to path,
// replacing an existing file only if replace is set.
func issueCert(path string, key crypto.Signer, cn string, replace bool) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("trust: serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial.Add(serial, big.NewInt(1)), // positive, non-zero
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"ferry"}},
		// Peers do not check validity dates (they check the key's
		// fingerprint); the hour of slack is for other tools.
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("trust: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("trust: parse new certificate: %w", err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(path, data, 0o644, replace); err != nil {
		return nil, err
	}
	return cert, nil
}

// writeFileAtomic writes data to a temporary file next to path, syncs it and
// then renames it over path (replace) or links it to path, failing with an
// error matching fs.ErrExist if path exists (!replace). Readers never see a
// partial file.
func writeFileAtomic(path string, data []byte, perm fs.FileMode, replace bool) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			f.Close()
		}
		os.Remove(tmp) // no-op after a rename
	}()
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	cerr := f.Close()
	f = nil
	if cerr != nil {
		return fmt.Errorf("trust: %w", cerr)
	}
	if replace {
		err = os.Rename(tmp, path)
	} else {
		err = os.Link(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	syncDir(dir)
	return nil
}

// syncDir makes a rename in dir durable; errors are ignored (some file
// systems do not support fsync on directories).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}
