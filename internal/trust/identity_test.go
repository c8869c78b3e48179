package trust

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newIdentity(t *testing.T) (*Identity, string) {
	t.Helper()
	dir := t.TempDir()
	id, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !created {
		t.Fatal("created = false for an empty directory")
	}
	return id, dir
}

func TestIdentityCreateAndReload(t *testing.T) {
	id, dir := newIdentity(t)

	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("key.pem mode %04o, want 0600", perm)
	}
	if _, err := os.Stat(filepath.Join(dir, CertFile)); err != nil {
		t.Fatal(err)
	}

	fp := id.Fingerprint()
	if got, err := ParseFingerprint(fp); err != nil || got != fp {
		t.Fatalf("ParseFingerprint(%q) = %q, %v", fp, got, err)
	}
	cert := id.Certificate()
	if want := FingerprintSPKI(cert.RawSubjectPublicKeyInfo); fp != want {
		t.Errorf("fingerprint %s, want SPKI fingerprint %s", fp, want)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("public key %T, want ECDSA P-256", cert.PublicKey)
	}
	host, _ := os.Hostname()
	host, _, _ = strings.Cut(host, ".")
	if !strings.HasPrefix(id.Name(), host+"-") || len(id.Name()) != len(host)+9 {
		t.Errorf("common name %q, want %q plus a random suffix", id.Name(), host+"-")
	}
	if d := time.Until(cert.NotAfter); d < 9*365*24*time.Hour || d > 11*365*24*time.Hour {
		t.Errorf("validity ends in %v, want about 10 years", d)
	}
	if cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %v", cert.KeyUsage)
	}
	if len(cert.ExtKeyUsage) != 2 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || cert.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ext key usage %v", cert.ExtKeyUsage)
	}
	if cert.IsCA {
		t.Error("certificate is a CA")
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		t.Errorf("not self-signed: %v", err)
	}

	again, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if created {
		t.Error("created = true on reload")
	}
	if again.Fingerprint() != fp || again.Name() != id.Name() {
		t.Errorf("reload: %s %s, want %s %s", again.Fingerprint(), again.Name(), fp, id.Name())
	}

	other, _ := newIdentity(t)
	if other.Fingerprint() == fp {
		t.Error("two identities have the same fingerprint")
	}
}

func TestIdentityNewCertificateKeepsFingerprint(t *testing.T) {
	id, dir := newIdentity(t)
	certPath := filepath.Join(dir, CertFile)

	// A lost certificate is re-issued for the same key.
	if err := os.Remove(certPath); err != nil {
		t.Fatal(err)
	}
	renewed, created, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if created {
		t.Error("created = true when only the certificate was missing")
	}
	if renewed.Fingerprint() != id.Fingerprint() {
		t.Errorf("fingerprint changed with the certificate: %s, want %s", renewed.Fingerprint(), id.Fingerprint())
	}
	if renewed.Certificate().SerialNumber.Cmp(id.Certificate().SerialNumber) == 0 {
		t.Error("same serial number: certificate was not re-issued")
	}

	// A certificate about to expire is renewed with the same name.
	key := renewed.TLSCertificate().PrivateKey.(*ecdsa.PrivateKey)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		Subject:      pkix.Name{CommonName: "old-name"},
		NotBefore:    time.Now().Add(-24 * time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	renewed, _, err = LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.Fingerprint() != id.Fingerprint() || renewed.Name() != "old-name" {
		t.Errorf("renewed: %s %q, want %s %q", renewed.Fingerprint(), renewed.Name(), id.Fingerprint(), "old-name")
	}
	if time.Until(renewed.Certificate().NotAfter) < 9*365*24*time.Hour {
		t.Errorf("renewed certificate expires at %v", renewed.Certificate().NotAfter)
	}
}

func TestIdentityRefusesBadFiles(t *testing.T) {
	t.Run("key readable by others", func(t *testing.T) {
		_, dir := newIdentity(t)
		if err := os.Chmod(filepath.Join(dir, KeyFile), 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := LoadOrCreate(dir)
		if err == nil || !strings.Contains(err.Error(), "must not be accessible by group or others") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("certificate without key", func(t *testing.T) {
		_, dir := newIdentity(t)
		if err := os.Remove(filepath.Join(dir, KeyFile)); err != nil {
			t.Fatal(err)
		}
		_, _, err := LoadOrCreate(dir)
		if err == nil || !strings.Contains(err.Error(), "refusing to create a new key") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("certificate for another key", func(t *testing.T) {
		_, dir := newIdentity(t)
		_, other := newIdentity(t)
		data, err := os.ReadFile(filepath.Join(other, CertFile))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, CertFile), data, 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err = LoadOrCreate(dir)
		if err == nil || !strings.Contains(err.Error(), "is not a certificate for the key") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("garbage key", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.MkdirAll(filepath.Join(dir, IdentityDir), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, KeyFile), []byte("nope"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreate(dir); err == nil {
			t.Fatal("no error")
		}
	})
}

func TestIdentityConcurrentCreate(t *testing.T) {
	dir := t.TempDir()
	const n = 8
	ids := make([]*Identity, n)
	created := make([]bool, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { ids[i], created[i], errs[i] = LoadOrCreate(dir) })
	}
	wg.Wait()
	ncreated := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if ids[i].Fingerprint() != ids[0].Fingerprint() {
			t.Errorf("identity %d: %s, want %s", i, ids[i].Fingerprint(), ids[0].Fingerprint())
		}
		if created[i] {
			ncreated++
		}
	}
	if ncreated != 1 {
		t.Errorf("%d callers report creating the key, want 1", ncreated)
	}
	left, _ := filepath.Glob(filepath.Join(dir, IdentityDir, ".*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}
