#!/usr/bin/env bash
# Build the Linux test guest for ferry from stock Debian packages:
#
#   OUT/vmlinuz         the Debian cloud kernel (bzImage), as packaged
#   OUT/vmlinux         the uncompressed ELF kernel taken out of it, for PVH boot
#   OUT/initrd.cpio.gz  a busybox initramfs whose /init reports, runs the
#                       checker (guest/linux/ferry-check) if the kernel command
#                       line asks for it, and reboots
#   OUT/cache/          downloaded .deb files, helper binaries, stamps
#
# Usage: scripts/linux-guest.sh [OUT]   (OUT defaults to build/linux)
#
# The packages are fetched with apt-get download and unpacked with dpkg-deb;
# nothing is installed on the host. Each step is skipped when its inputs are
# unchanged, so a second run does no downloads and takes about a second.
# Quiet unless something fails; ends with one summary line.
# See docs/linux-guests.md.
set -euo pipefail

prog=linux-guest
kernel_meta=linux-image-cloud-amd64
busybox_pkg=busybox-static

die() {
	echo "$prog: error: $*" >&2
	exit 1
}

if [ $# -gt 1 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
	echo "usage: $0 [output-dir]   (default build/linux)" >&2
	exit 2
fi

out_arg=${1:-build/linux}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self="$repo/scripts/linux-guest.sh"

for tool in apt-get apt-cache dpkg dpkg-deb tar go sha256sum make gcc; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "'$tool' not found: this script needs a Debian-based host with Go, gcc and make installed"
done
host_arch=$(dpkg --print-architecture)
[ "$host_arch" = amd64 ] ||
	die "host architecture is $host_arch; the guest kernel and busybox are amd64 packages, run this on an amd64 Debian host"

mkdir -p "$out_arg" || die "cannot create $out_arg"
out=$(cd "$out_arg" && pwd)
cache="$out/cache"
mkdir -p "$cache/bin"

# One run at a time per output directory (parallel make, concurrent tests).
if command -v flock >/dev/null 2>&1; then
	exec 9>"$cache/lock"
	flock 9
fi

log=$(mktemp "$cache/log.XXXXXX")
tmpdirs=()
cleanup() {
	rm -f "$log"
	if [ ${#tmpdirs[@]} -gt 0 ]; then rm -rf "${tmpdirs[@]}"; fi
}
trap cleanup EXIT

# quiet CMD...: run CMD with its output kept back, shown only if it fails.
quiet() {
	if ! "$@" >"$log" 2>&1; then
		cat "$log" >&2
		die "failed: $*"
	fi
}

# newtmp: make a scratch directory, removed on exit, and name it in $tmp.
newtmp() {
	tmp=$(mktemp -d "$cache/tmp.XXXXXX")
	tmpdirs+=("$tmp")
}

# --- apt ---------------------------------------------------------------

apt_updated=no
apt_update() {
	[ "$apt_updated" = no ] || return 0
	if [ "$(id -u)" != 0 ]; then
		die "apt's package lists are empty or out of date, and refreshing them needs root: run 'sudo apt-get update' (or run this script as root)"
	fi
	quiet apt-get update -q
	apt_updated=yes
}

# Give apt-cache a binary cache of its own inside the output directory:
# Debian's container images turn apt's off, and without one each query
# re-reads every package list (about 0.6 s a call).
mkdir -p "$cache/apt"
apt_opts=(-o "Dir::Cache::pkgcache=$cache/apt/pkgcache.bin"
	-o "Dir::Cache::srcpkgcache=$cache/apt/srcpkgcache.bin")

# candidate PKG: the version apt would install, or nothing.
candidate() {
	apt-cache "${apt_opts[@]}" policy "$1" 2>/dev/null |
		sed -n 's/^ *Candidate: //p' | grep -v '^(none)$' | head -n 1 || true
}

known() {
	[ -n "$(candidate "$1")" ]
}

# kernel_package: the linux-image-* package the metapackage currently depends on.
kernel_package() {
	apt-cache "${apt_opts[@]}" depends "$kernel_meta" 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1 || true
}

# fetch PKG STALE_GLOB: set $deb to the path of PKG's candidate .deb in the
# cache, downloading it first if it is not there; older .debs matching
# STALE_GLOB are then removed. Returns 1 if the download fails and dies on
# other errors. (Callers test its status, which turns off set -e inside it,
# so every step checks for itself.)
fetch() {
	local pkg=$1 stale=$2 ver f old
	ver=$(candidate "$pkg")
	[ -n "$ver" ] || die "apt has no candidate version of $pkg"
	# apt-get download names the file PKG_VERSION_ARCH.deb, ':' as %3a.
	for deb in "$cache/${pkg}_${ver//:/%3a}_"*.deb; do
		[ -s "$deb" ] && return 0
	done
	newtmp || die "cannot make a scratch directory in $cache"
	# APT::Sandbox::User=root: apt's _apt user may have no write access to
	# the cache directory. apt still checks the file against the signed
	# package lists.
	if ! (cd "$tmp" && apt-get download -q "${apt_opts[@]}" -o APT::Sandbox::User=root "$pkg=$ver") >"$log" 2>&1; then
		cat "$log" >&2
		echo "$prog: apt-get download $pkg=$ver failed" >&2
		return 1
	fi
	f=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n 1)
	[ -n "$f" ] || die "apt-get download $pkg=$ver produced no .deb"
	for old in "$cache"/$stale; do
		if [ -e "$old" ]; then rm -f "$old" || die "cannot remove $old"; fi
	done
	deb="$cache/$(basename "$f")"
	mv "$f" "$deb" || die "cannot move the downloaded $pkg into $cache"
}

fetch_all() {
	fetch "$kernel_pkg" 'linux-image-*.deb' || return 1
	kernel_deb=$deb
	fetch "$busybox_pkg" "${busybox_pkg}_*.deb" || return 1
	busybox_deb=$deb
}

# Make sure apt knows the packages, refreshing its lists once if not.
if ! known "$kernel_meta" || ! known "$busybox_pkg"; then
	apt_update
	known "$kernel_meta" ||
		die "apt does not know $kernel_meta even after apt-get update: is Debian's main archive (bookworm or later) in the apt sources?"
	known "$busybox_pkg" ||
		die "apt does not know $busybox_pkg even after apt-get update"
fi

kernel_pkg=$(kernel_package)
[ -n "$kernel_pkg" ] || die "cannot find the linux-image-* dependency of $kernel_meta (apt-cache depends $kernel_meta)"

# Out-of-date package lists name versions the mirror has since dropped:
# one retry after apt-get update covers that.
if ! fetch_all; then
	[ "$apt_updated" = no ] || die "cannot download the packages"
	echo "$prog: refreshing apt's package lists and trying again" >&2
	apt_update
	kernel_pkg=$(kernel_package)
	[ -n "$kernel_pkg" ] || die "cannot find the linux-image-* dependency of $kernel_meta"
	fetch_all || die "cannot download the packages"
fi

# --- stamps ------------------------------------------------------------

# up_to_date NAME KEY FILE: is FILE there and was it made from inputs KEY?
up_to_date() {
	[ -s "$3" ] && [ -f "$cache/$1.stamp" ] && [ "$(cat "$cache/$1.stamp")" = "$2" ]
}
stamp() {
	printf '%s\n' "$2" >"$cache/$1.stamp"
}
hash_of() {
	sha256sum "$1" | cut -d ' ' -f 1
}

# build_tool NAME: build scripts/NAME (a Go command) into the cache.
build_tool() {
	if ! (cd "$repo" && go build -buildvcs=false -o "$cache/bin/$1" "./scripts/$1") >"$log" 2>&1; then
		cat "$log" >&2
		die "cannot build scripts/$1"
	fi
}

# build_checker: build guest/linux/ferry-check (static C) into the cache;
# make rebuilds it only when its source or Makefile changed.
build_checker() {
	if ! make -s -C "$repo/guest/linux" OUT="$cache/bin" >"$log" 2>&1; then
		cat "$log" >&2
		die "cannot build guest/linux/ferry-check (needs gcc and glibc's static libraries, Debian's libc6-dev)"
	fi
}

# --- vmlinuz -----------------------------------------------------------

key="deb=$(basename "$kernel_deb")"
if ! up_to_date vmlinuz "$key" "$out/vmlinuz" || [ ! -s "$cache/kernel.release" ]; then
	newtmp
	d=$tmp
	dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$d" --wildcards './boot/vmlinuz-*' ||
		die "cannot extract /boot/vmlinuz-* from $kernel_deb"
	set -- "$d"/boot/vmlinuz-*
	if [ $# -ne 1 ] || [ ! -s "$1" ]; then
		die "$kernel_deb holds $# /boot/vmlinuz-* files, expected one"
	fi
	basename "$1" | sed 's/^vmlinuz-//' >"$cache/kernel.release"
	mv "$1" "$out/vmlinuz"
	stamp vmlinuz "$key"
fi
kernel_release=$(cat "$cache/kernel.release")

# --- vmlinux -----------------------------------------------------------

key="deb=$(basename "$kernel_deb") tool=$(hash_of "$repo/scripts/extract-vmlinux/main.go")"
if ! up_to_date vmlinux "$key" "$out/vmlinux" || [ ! -s "$cache/vmlinux.info" ]; then
	build_tool extract-vmlinux
	"$cache/bin/extract-vmlinux" -o "$out/vmlinux" "$out/vmlinuz" >"$cache/vmlinux.info" ||
		die "cannot get a PVH-bootable vmlinux out of $out/vmlinuz"
	stamp vmlinux "$key"
fi
info=$(cat "$cache/vmlinux.info")
pvh_entry=$(sed -n 's/.*PVH entry \(0x[0-9a-fA-F]*\).*/\1/p' <<<"$info")
compression=$(sed -n 's/.* from \([a-z0-9]*\) payload .*/\1/p' <<<"$info")

# --- initrd.cpio.gz ----------------------------------------------------

# /init of the guest. Its first line of output is what the tests wait for.
# It ends with reboot -f: without ACPI the kernel has no way to power off
# (poweroff -f would end in "Attempted to kill init"), while a reboot always
# ends in an i8042 reset or a triple fault, which ferry takes as the end.
read -r -d '' init_script <<'EOF' || true
#!/bin/sh
# /init of ferry's Linux test guest, written by scripts/linux-guest.sh.
echo "ferry-linux: init started"
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "ferry-linux: uname: $(uname -a)"

cpus=
if read -r online 2>/dev/null </sys/devices/system/cpu/online; then
	cpus=0
	IFS=,
	for r in $online; do
		case $r in
		*-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1)) ;;
		*) cpus=$((cpus + 1)) ;;
		esac
	done
	unset IFS
else
	cpus=$(nproc)
fi
echo "ferry-linux: cpus=$cpus"

mem=unknown
while read -r k v _; do
	if [ "$k" = MemTotal: ]; then
		mem=$v
		break
	fi
done </proc/meminfo
echo "ferry-linux: mem_kb=$mem"

# The kernel's own virtio modules (Debian's cloud kernel builds them as
# modules), dependencies first; then what the PCI bus holds.
n=0
while read -r m; do
	insmod "/lib/modules/$m" 2>/dev/null && n=$((n + 1)) || echo "ferry-linux: warning: insmod $m failed"
done </etc/ferry-modules
echo "ferry-linux: modules loaded=$n"
for d in /sys/bus/pci/devices/*; do
	[ -e "$d/vendor" ] || continue
	drv=none
	[ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
	echo "ferry-linux: pci ${d##*/} $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class") driver=$drv"
done
if read -r rng 2>/dev/null </sys/class/misc/hw_random/rng_current && [ "$rng" != none ]; then
	echo "ferry-linux: hwrng=$rng read=$(head -c 4096 /dev/hwrng | wc -c)"
	# ferry.hwrng_rounds=N reads the device N times more, a second apart,
	# so that a test can save, restore or move the guest while it is in
	# use: in the background when the checker runs too (ferry.check).
	rounds=0 bg=no
	read -r cmdline </proc/cmdline
	for a in $cmdline; do
		case $a in
		ferry.hwrng_rounds=*) rounds=${a#ferry.hwrng_rounds=} ;;
		ferry.check | ferry.check=*) bg=yes ;;
		esac
	done
	hwrng_rounds() {
		i=1
		while [ "$i" -le "$rounds" ]; do
			sleep 1
			echo "ferry-linux: hwrng round=$i read=$(head -c 4096 /dev/hwrng | wc -c)"
			i=$((i + 1))
		done
	}
	if [ "$bg" = yes ]; then
		hwrng_rounds &
	else
		hwrng_rounds
	fi
fi

# ferry.check=ARGS on the kernel command line runs the checker, ARGS being
# its arguments separated by commas (ferry.check=size=16M,exit_after=60s
# runs "ferry-check size=16M exit_after=60s"); a bare ferry.check runs it
# with its defaults. See docs/linux-guests.md, "The checker".
set -f
check=no
read -r cmdline </proc/cmdline
for a in $cmdline; do
	case $a in
	ferry.check) check=yes args= ;;
	ferry.check=*) check=yes args=${a#ferry.check=} ;;
	esac
done
if [ "$check" = yes ]; then
	IFS=, # split ARGS on commas (set -f: no globbing)
	set -- $args
	unset IFS
	echo "ferry-linux: check started: ferry-check $*"
	ferry-check "$@"
	echo "ferry-linux: check exit=$?"
fi
set +f

echo "ferry-linux: done, rebooting"
reboot -f
echo "ferry-linux: reboot -f failed, trying poweroff -f"
poweroff -f
while :; do sleep 3600; done
EOF

applets="sh ash cat echo printf ls mkdir mknod ln rm cp mv mount umount
	uname nproc free dmesg grep sed awk head tail wc ps sleep sync
	true false test [ reboot poweroff halt insmod readlink basename"

# Guest kernel modules for ferry's devices, with their dependencies from
# each module's own modinfo (the .deb has no modules.dep).
guest_modules="virtio_pci virtio_rng virtio_net virtio_blk"

build_checker
key="deb=$(basename "$busybox_deb") kernel=$(basename "$kernel_deb") tool=$(hash_of "$repo/scripts/mkinitramfs/main.go") script=$(hash_of "$self") check=$(hash_of "$cache/bin/ferry-check")"
if ! up_to_date initrd "$key" "$out/initrd.cpio.gz"; then
	newtmp
	d=$tmp
	dpkg-deb --fsys-tarfile "$busybox_deb" | tar -x -C "$d" ./bin/busybox ||
		die "cannot extract /bin/busybox from $busybox_deb"
	dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$d" ./lib/modules ||
		die "cannot extract /lib/modules from $kernel_deb"
	mdir=$d/lib/modules/$kernel_release
	declare -A path_of=() done_mod=()
	while IFS= read -r f; do
		m=$(basename "$f" .ko)
		path_of[${m//-/_}]=${f#"$mdir"/}
	done < <(find "$mdir" -name '*.ko')
	order=()
	load_module() { # depth first: a module's dependencies come before it
		local m=${1//-/_} deps dep
		[ -z "${done_mod[$m]:-}" ] || return 0
		done_mod[$m]=1
		[ -n "${path_of[$m]:-}" ] || die "module $m not in $(basename "$kernel_deb")"
		deps=$(tr '\0' '\n' <"$mdir/${path_of[$m]}" | sed -n 's/^depends=//p' | tr ',' ' ')
		for dep in $deps; do load_module "$dep"; done
		order+=("${path_of[$m]}")
	}
	for m in $guest_modules; do load_module "$m"; done
	printf '%s\n' "${order[@]}" >"$d/ferry-modules"
	cp "$cache/bin/ferry-check" "$d/bin/ferry-check" || die "cannot copy ferry-check"
	printf '%s\n' "$init_script" >"$d/init"
	{
		echo "dir /bin 0755 0 0"
		echo "dir /sbin 0755 0 0"
		echo "dir /dev 0755 0 0"
		echo "dir /proc 0555 0 0"
		echo "dir /sys 0555 0 0"
		echo "dir /tmp 1777 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "file /bin/busybox bin/busybox 0755 0 0"
		echo "file /bin/ferry-check bin/ferry-check 0755 0 0"
		for a in $applets; do
			echo "slink /bin/$a busybox 0777 0 0"
		done
		echo "dir /etc 0755 0 0"
		echo "file /etc/ferry-modules ferry-modules 0644 0 0"
		echo "dir /lib 0755 0 0"
		echo "dir /lib/modules 0755 0 0"
		declare -A seen_dir=()
		for p in "${order[@]}"; do
			dir=
			IFS=/ read -r -a parts <<<"${p%/*}"
			for part in "${parts[@]}"; do
				dir+=/$part
				[ -z "${seen_dir[$dir]:-}" ] || continue
				seen_dir[$dir]=1
				echo "dir /lib/modules$dir 0755 0 0"
			done
			echo "file /lib/modules/$p lib/modules/$kernel_release/$p 0644 0 0"
		done
		echo "file /init init 0755 0 0"
	} >"$d/spec"
	build_tool mkinitramfs
	# Sources in the spec are relative to $d: the spec format splits on blanks.
	(cd "$d" && quiet "$cache/bin/mkinitramfs" -o "$out/initrd.cpio.gz" spec)
	stamp initrd "$key"
fi

# --- summary -----------------------------------------------------------

size() {
	local n
	n=$(stat -c %s "$1")
	if command -v numfmt >/dev/null 2>&1; then
		numfmt --to=iec-i --suffix=B --format=%.1f "$n"
	else
		echo "$n bytes"
	fi
}
o=${out_arg%/}
echo "$prog: Linux $kernel_release ($kernel_pkg $(dpkg-deb -f "$kernel_deb" Version), $compression):" \
	"$o/vmlinuz $(size "$out/vmlinuz"), $o/vmlinux $(size "$out/vmlinux") PVH entry $pvh_entry," \
	"$o/initrd.cpio.gz $(size "$out/initrd.cpio.gz")"
