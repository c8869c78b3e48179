#!/usr/bin/env bash
# Build the base image of the lab's emulated hosts (docs/lab.md) from stock
# Debian packages:
#
#   OUT/vmlinuz      the host kernel: Debian's cloud kernel, the same .deb as
#                    the Linux guest's (scripts/linux-guest.sh fetches it)
#   OUT/host.cpio    the host's base initramfs (plain cpio: the host kernel
#                    runs under TCG, where gunzip alone would take seconds):
#                    busybox, the kernel's own modules a VM host needs and
#                    what they depend on, iproute2's tc with its libraries,
#                    and /init
#   OUT/cache/       stamps
#
# What changes from run to run (the static ferry, the guest images) is not
# in here: internal/lab appends it as a second cpio archive at start, so
# this image is rebuilt only when its inputs change.
#
# Usage: scripts/lab-host.sh [OUT]   (OUT defaults to build/lab)
# Quiet unless something fails; ends with one summary line.
set -euo pipefail

prog=lab-host
die() {
	echo "$prog: error: $*" >&2
	exit 1
}
[ $# -le 1 ] || die "usage: $0 [output-dir]"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_arg=${1:-build/lab}
mkdir -p "$out_arg/cache" || die "cannot create $out_arg"
out=$(cd "$out_arg" && pwd)
cache=$out/cache

if command -v flock >/dev/null 2>&1; then
	exec 9>"$cache/lock"
	flock 9
fi

# The kernel and busybox packages: the Linux guest's script fetches and
# caches them (and checks them against apt's signed lists).
"$repo/scripts/linux-guest.sh" "$repo/build/linux" >/dev/null ||
	die "scripts/linux-guest.sh failed"
lcache=$repo/build/linux/cache
kernel_deb=$(ls "$lcache"/linux-image-*.deb 2>/dev/null | head -n 1)
busybox_deb=$(ls "$lcache"/busybox-static_*.deb 2>/dev/null | head -n 1)
[ -n "$kernel_deb" ] && [ -n "$busybox_deb" ] || die "no kernel or busybox .deb in $lcache"
release=$(cat "$lcache/kernel.release")

# What a VM host needs. Dependencies are added from each module's own
# modinfo (the .deb has no modules.dep: depmod makes it at install time).
wanted="kvm-amd virtio_pci virtio_net virtio_blk virtio_console tun tap bridge veth
	sch_tbf sch_netem vhost_net"
# Host programs beyond busybox (busybox's tc cannot set up tbf or netem).
tools="/sbin/tc"
for t in $tools; do [ -x "$t" ] || die "$t missing (Debian package iproute2)"; done

hash_of() { sha256sum "$1" | cut -d ' ' -f 1; }
key="kernel=$(basename "$kernel_deb") busybox=$(basename "$busybox_deb") script=$(hash_of "$0")"
key+=" mk=$(hash_of "$repo/scripts/mkinitramfs/main.go") cpio=$(hash_of "$repo/internal/cpio/cpio.go")"
for t in $tools; do key+=" $t=$(hash_of "$t")"; done
if [ -s "$out/host.cpio" ] && [ -s "$out/vmlinuz" ] && [ "$(cat "$cache/host.stamp" 2>/dev/null)" = "$key" ]; then
	echo "$prog: up to date: $out_arg/vmlinuz, $out_arg/host.cpio ($(du -h "$out/host.cpio" | cut -f1))"
	exit 0
fi

tmp=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
mkdir -p "$root"
spec=$tmp/spec
: >"$spec"
add_file() { # add_file NAME SOURCE MODE
	echo "file $1 $2 $3 0 0" >>"$spec"
}

# --- kernel and modules --------------------------------------------------
dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$root" ./lib/modules ./boot ||
	die "cannot unpack $kernel_deb"
mdir=$root/lib/modules/$release
[ -d "$mdir" ] || die "$kernel_deb has no /lib/modules/$release"
cp "$root/boot/vmlinuz-$release" "$out/vmlinuz.new" && mv "$out/vmlinuz.new" "$out/vmlinuz"

declare -A path_of=() done_mod=()
while IFS= read -r f; do
	n=$(basename "$f" .ko)
	path_of[${n//-/_}]=${f#"$mdir"/}
done < <(find "$mdir" -name '*.ko')
order=()
load() { # depth first: a module's dependencies come before it
	local n=${1//-/_} deps d
	[ -z "${done_mod[$n]:-}" ] || return 0
	done_mod[$n]=1
	[ -n "${path_of[$n]:-}" ] || die "module $n not in $(basename "$kernel_deb")"
	deps=$(tr '\0' '\n' <"$mdir/${path_of[$n]}" | sed -n 's/^depends=//p' | tr ',' ' ')
	for d in $deps; do load "$d"; done
	order+=("${path_of[$n]}")
}
load irqbypass # kvm's, loaded through a symbol the modinfo does not name
for m in $wanted; do load "$m"; done
printf '%s\n' "${order[@]}" >"$tmp/modules"
add_file /etc/ferry-lab/modules "$tmp/modules" 0644
for p in "${order[@]}"; do
	add_file "/lib/modules/$release/$p" "$mdir/$p" 0644
done

# --- busybox, with every applet it has --------------------------------------
dpkg-deb --fsys-tarfile "$busybox_deb" | tar -x -C "$tmp" ./bin/busybox || die "cannot unpack $busybox_deb"
add_file /bin/busybox "$tmp/bin/busybox" 0755
for a in $("$tmp/bin/busybox" --list); do
	[ "$a" = busybox ] || echo "slink /bin/$a busybox 0777 0 0" >>"$spec"
done

# --- tools with their shared libraries -----------------------------------
declare -A have=()
for t in $tools; do
	add_file "$t" "$t" 0755
	for lib in $(ldd "$t" | grep -o '/[^ ]*'); do
		real=$(readlink -f "$lib")
		[ -z "${have[$lib]:-}" ] || continue
		have[$lib]=1
		add_file "$lib" "$real" 0755
	done
done

# --- /init ---------------------------------------------------------------
cat >"$tmp/init" <<'INIT'
#!/bin/sh
# /init of a ferry lab host, written by scripts/lab-host.sh (docs/lab.md).
# Loads the host's modules, sets up its two NICs (found by MAC: control
# 52:54:00:fe:..., link 52:54:00:77:...), and starts the lab agent, which
# the lab drives everything else through. Lines for the lab start with
# "ferry-lab:"; it never exits.
export PATH=/opt/ferry/bin:/sbin:/bin:/usr/sbin:/usr/bin
say() { echo "ferry-lab: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /var
mount -t devpts devpts /dev/pts
for d in /dev/shm /tmp /run /var; do mount -t tmpfs tmpfs "$d"; done
rel=$(uname -r)
# KVM takes the TSC rate when kvm-amd loads. A 1-CPU host refines its TSC
# calibration a few seconds into boot (then switches to the tsc
# clocksource): wait for that, so that the rate KVM gives guests is the
# refined one (a 2-CPU host under TCG never refines; it keeps the rate
# tsc_early_khz= gave it).
if [ "$(nproc)" = 1 ]; then
	i=0
	while [ "$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)" != tsc ] && [ $i -lt 60 ]; do
		sleep 0.1
		i=$((i + 1))
	done
fi
while read -r m; do
	insmod "/lib/modules/$rel/$m" 2>/dev/null || say "warning: insmod $m failed"
done </etc/ferry-lab/modules

name=lab addr= token= agent=10.0.2.15:7000 mtu=
for p in $(cat /proc/cmdline); do
	case $p in
	ferry.lab.name=*) name=${p#*=} ;;
	ferry.lab.addr=*) addr=${p#*=} ;;
	ferry.lab.token=*) token=${p#*=} ;;
	ferry.lab.mtu=*) mtu=${p#*=} ;;
	esac
done
hostname "$name"
ip link set lo up
ctl= link=
for n in /sys/class/net/*; do
	read -r mac <"$n/address"
	case $mac in
	52:54:00:fe:*) ctl=${n##*/} ;;
	52:54:00:77:*) link=${n##*/} ;;
	esac
done
[ -n "$ctl" ] || say "FAIL no control NIC"
ip addr add 10.0.2.15/24 dev "$ctl" && ip link set "$ctl" up
if [ -n "$link" ] && [ -n "$addr" ]; then
	[ -z "$mtu" ] || ip link set "$link" mtu "$mtu"
	ip addr add "$addr" dev "$link" && ip link set "$link" up
fi
kvm=no
[ -c /dev/kvm ] && kvm=yes
umask 077
printf '%s\n' "$token" >/run/ferry-lab.token
umask 022
ferry lab-agent --listen "$agent" --token-file /run/ferry-lab.token >/var/agent.log 2>&1 &
say "ready name=$name kvm=$kvm link=${link:-none} addr=${addr:-none} cpus=$(nproc)"
while :; do sleep 3600; done
INIT
add_file /init "$tmp/init" 0755
cat >>"$spec" <<'SPEC'
dir /dev 0755 0 0
dir /proc 0555 0 0
dir /sys 0555 0 0
dir /tmp 1777 0 0
dir /run 0755 0 0
dir /var 0755 0 0
dir /sbin 0755 0 0
dir /usr/bin 0755 0 0
dir /usr/sbin 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
SPEC

go build -buildvcs=false -o "$tmp/mkinitramfs" "$repo/scripts/mkinitramfs" >"$tmp/log" 2>&1 ||
	{ cat "$tmp/log" >&2; die "cannot build scripts/mkinitramfs"; }
"$tmp/mkinitramfs" -o "$out/host.cpio" "$spec" || die "mkinitramfs failed"
printf '%s\n' "$key" >"$cache/host.stamp"
echo "$prog: Linux $release host: $out_arg/vmlinuz, $out_arg/host.cpio ($(du -h "$out/host.cpio" | cut -f1)," \
	"${#order[@]} modules, busybox, $tools)"
