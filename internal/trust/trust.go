// Package trust owns a host's identity (a private key and a self-signed
// certificate), the pool of trusted peer hosts, and the TLS configurations
// built from them.
//
// Peers are authenticated by the fingerprint of their certificate's public
// key, never by name or by a certificate authority: a connection between two
// daemons succeeds only if each side finds the other's fingerprint in its
// pool (see docs/trust.md). Every connection is TLS 1.3 with mutual
// authentication.
//
// The package must not know about VMs, migration or the daemon's API.
package trust
