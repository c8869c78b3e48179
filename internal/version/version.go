// Package version holds ferry's version string, reported in migration
// handshakes, state files and `ferry version`. It depends on nothing.
package version

// Version is ferry's release version.
const Version = "0.1.0-dev"
