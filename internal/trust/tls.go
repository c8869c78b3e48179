package trust

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
)

// UntrustedPeerError is the error of a handshake refused because of the
// peer's certificate.
type UntrustedPeerError struct {
	// Fingerprint is that of the certificate the peer presented (empty if
	// it presented none). The refusal happens before the peer has proved
	// possession of the matching key, so this is a claim, not an identity.
	Fingerprint string
	// Addr is the peer's address, if known.
	Addr string
	// Expected is the pinned fingerprint, for a pinned client
	// (ClientConfigPinned, DialPinned); empty otherwise.
	Expected string
	// Reason says why the peer was refused.
	Reason string
}

func (e *UntrustedPeerError) Error() string {
	s := "trust: refused untrusted peer"
	if e.Addr != "" {
		s += " " + e.Addr
	}
	if e.Fingerprint != "" {
		s += " (fingerprint " + e.Fingerprint + ")"
	}
	return s + ": " + e.Reason
}

// Reasons for an UntrustedPeerError.
const (
	reasonNotInPool = "not in the trust pool"
	reasonNoCert    = "no certificate presented"
)

// checkFunc decides on a peer's fingerprint: it returns "" to accept it or
// the reason for refusing it.
type checkFunc func(fingerprint string) (reason string)

func poolCheck(pool *Pool) checkFunc {
	return func(fp string) string {
		if _, ok, err := pool.lookup(fp); !ok {
			if err != nil {
				return reasonNotInPool + " (the pool is unusable: " + err.Error() + ")"
			}
			return reasonNotInPool
		}
		return ""
	}
}

func pinCheck(expected string) checkFunc {
	return func(fp string) string {
		if fp != expected {
			return "fingerprint does not match the expected " + expected
		}
		return ""
	}
}

// verifyConn returns a tls.Config.VerifyConnection function that accepts a
// peer presenting exactly one certificate whose fingerprint check accepts.
// A refusal is logged at Warn level with the peer's fingerprint, its
// address (addr, if not empty) and our role ("server" or "client").
//
// VerifyConnection, unlike VerifyPeerCertificate, also runs on resumed
// sessions; ferry disables resumption anyway.
func verifyConn(check checkFunc, expected, addr, role string, log *slog.Logger) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		e := &UntrustedPeerError{Addr: addr, Expected: expected}
		certs := cs.PeerCertificates
		switch {
		case len(certs) == 0:
			e.Reason = reasonNoCert
		case len(certs) > 1:
			e.Fingerprint = CertFingerprint(certs[0])
			e.Reason = fmt.Sprintf("presented %d certificates, want exactly 1", len(certs))
		default:
			e.Fingerprint = CertFingerprint(certs[0])
			e.Reason = check(e.Fingerprint)
			if e.Reason == "" {
				return nil
			}
		}
		attrs := []any{"fingerprint", e.Fingerprint}
		if addr != "" {
			attrs = append(attrs, "remote", addr)
		}
		if len(certs) > 0 {
			attrs = append(attrs, "peer_cn", certs[0].Subject.CommonName)
		}
		attrs = append(attrs, "role", role, "reason", e.Reason)
		log.Warn("refused untrusted peer", attrs...)
		return e
	}
}

func orDiscard(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}

// baseConfig is what server and client configurations share: TLS 1.3 only,
// our certificate, no session resumption (a resumed session would skip the
// certificate exchange, and a peer removed from the pool must be refused on
// its next connection).
func baseConfig(id *Identity) *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{id.TLSCertificate()},
		SessionTicketsDisabled: true,
	}
}

func serverConfig(id *Identity, check checkFunc, addr string, log *slog.Logger) *tls.Config {
	c := baseConfig(id)
	c.ClientAuth = tls.RequireAnyClientCert
	c.VerifyConnection = verifyConn(check, "", addr, "server", log)
	return c
}

// ServerConfig returns the configuration for accepting connections from
// peers: TLS 1.3 only, the identity's certificate, a client certificate
// required and accepted only if its fingerprint is in pool. A refused client
// is logged on log (nil: no logging) at Warn level as "refused untrusted
// peer" with its fingerprint and remote address.
//
// The configuration works through GetConfigForClient (to learn each
// client's address); callers must not set that field or the verification
// callbacks. Prefer Listen, which also bounds handshake time.
func ServerConfig(id *Identity, pool *Pool, log *slog.Logger) *tls.Config {
	log = orDiscard(log)
	check := poolCheck(pool)
	c := serverConfig(id, check, "", log)
	c.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		addr := ""
		if hello.Conn != nil && hello.Conn.RemoteAddr() != nil {
			addr = hello.Conn.RemoteAddr().String()
		}
		return serverConfig(id, check, addr, log), nil
	}
	return c
}

func clientConfig(id *Identity, check checkFunc, expected, addr string, log *slog.Logger) *tls.Config {
	c := baseConfig(id)
	// The server's certificate is self-signed and carries no useful name:
	// skip the CA and name checks, verifyConn checks its fingerprint.
	c.InsecureSkipVerify = true
	c.VerifyConnection = verifyConn(check, expected, addr, "client", log)
	return c
}

// ClientConfig returns the configuration for connecting to a peer: TLS 1.3
// only, the identity's certificate presented, and the server accepted only
// if its fingerprint is in pool. A refused server is logged on log (nil: no
// logging) at Warn level; the configuration does not know the server's
// address, which Dial adds to the log and to the *UntrustedPeerError.
func ClientConfig(id *Identity, pool *Pool, log *slog.Logger) *tls.Config {
	return clientConfig(id, poolCheck(pool), "", "", orDiscard(log))
}

// ClientConfigPinned returns a client configuration that accepts only the
// server whose fingerprint is expectedFingerprint, whatever the pool says:
// the bootstrap of `ferry nodes trust ADDR --fingerprint F`, where the
// operator-given F is verified on the wire before it enters the pool.
func ClientConfigPinned(id *Identity, expectedFingerprint string) (*tls.Config, error) {
	fp, err := ParseFingerprint(expectedFingerprint)
	if err != nil {
		return nil, err
	}
	return clientConfig(id, pinCheck(fp), fp, "", orDiscard(nil)), nil
}

// PeerFingerprint returns the fingerprint of the certificate the peer of a
// completed handshake presented, or "" if there is none.
func PeerFingerprint(c *tls.Conn) string {
	certs := c.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return ""
	}
	return CertFingerprint(certs[0])
}

// RefusedByPeer reports whether err is the TLS alert a peer sends when it
// refuses our certificate. With TLS 1.3 a client learns that the server
// refused it only when it first reads from the connection: Dial succeeds
// (the server was verified) and the first Read fails with such an error.
func RefusedByPeer(err error) bool {
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "remote error" || oe.Err == nil {
		return false
	}
	// The alert type is not exported; its text is stable.
	switch oe.Err.Error() {
	case "tls: bad certificate", "tls: certificate required", "tls: unknown certificate", "tls: unsupported certificate",
		"tls: unknown certificate authority", "tls: access denied":
		return true
	}
	return false
}
