#!/bin/bash
# guest.sh: run a shell command inside a throwaway QEMU guest whose kernel has nbd.ko.
# (The project's copy of the recipe in shared/vm/nbd-guest.sh; the end-to-end tests use it.)
#
# The host kernel has no nbd module, so we boot Debian's stock kernel (linux-image-amd64, 6.1)
# under QEMU. The guest's root filesystem is the host's own root, shared read-only over 9p with a
# tmpfs overlay on top: every host binary (nbd-client, mkfs.ext4, fio, the project's build output)
# is there at the same path, and whatever the guest writes is discarded at power-off.
# The host is reachable from the guest at 10.0.2.2 (QEMU user networking): a guest connection to
# 10.0.2.2:PORT is made by QEMU itself as a host connection to 127.0.0.1:PORT, so servers listen
# on loopback only. A server can also run inside the guest, on the guest's own 127.0.0.1.
# Needs root on Debian (tested on bookworm). On these machines /dev/kvm is PVM and cannot run a
# stock kernel, so the guest runs under TCG: ~4 s from start to CMD, ~2-3k 4k-IOPS on /dev/nbd0.
#
# Usage:
#   nbd-guest.sh setup       install the Debian packages and fill the cache (idempotent)
#   nbd-guest.sh run 'CMD'   boot, run CMD with bash in the guest (in the caller's cwd), power
#                            off. Streams CMD's stdout+stderr to stdout; exits with CMD's status,
#                            124 on timeout, 125 if the guest failed before CMD finished.
#   e.g. nbd-guest.sh run 'nbd-client $NBD_HOST 10809 /dev/nbd0 -N vol1 && mkfs.ext4 -q /dev/nbd0'
# Environment:
#   NBD_GUEST_CACHE    cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/nbd-guest, ~440 MB)
#   NBD_GUEST_TIMEOUT  seconds before the guest is killed (default 600)
#   NBD_GUEST_MEM, NBD_GUEST_CPUS   guest size (default 1024 MiB, 2 CPUs)
#   NBD_GUEST_RW       space-separated host dirs the guest may write to, at the same paths
#   NBD_GUEST_ACCEL    kvm or tcg (default kvm where /dev/kvm can run a stock kernel, else tcg)
#   NBD_GUEST_VERBOSE  1: also print the guest's kernel console to stderr
# In the guest: nbd and loop are loaded (modprobe works for other modules), NBD_HOST=10.0.2.2. The guest
# sees host files as they were at boot (cached); pass results back through NBD_GUEST_RW or stdout.
set -euo pipefail

CACHE=${NBD_GUEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/nbd-guest}
BOOT_MODULES="virtio_pci virtio_net virtio_console 9pnet_virtio 9p overlay"
log() { echo "nbd-guest: $*" >&2; }

install_packages() {
  local missing=() p
  for p in busybox-static kmod nbd-client e2fsprogs xfsprogs fio xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  [ ${#missing[@]} -gt 0 ] || [ ! -e "$CACHE/kernel/ok" ] || return 0
  log "apt-get update; installing: ${missing[*]:-nothing}"
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -qq -o APT::Sandbox::User=root) bpo=()
  # Where qemu-utils (qemu-img, qemu-nbd) came from backports, as on this project's machines,
  # take qemu-system-x86 from there too: the stable one Breaks it and apt would remove it.
  # The extra source is given on the command line only; /etc/apt is left alone.
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] &&
     dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo'; then
    . /etc/os-release
    # The mirror is the one this machine's apt already uses for the main archive.
    local mirror
    mirror=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
             grep -oE 'https?://[^ ]+/debian/?$|https?://[^ ]+/debian ' | head -1 | tr -d ' ')
    [ -n "$mirror" ] || { log "no Debian mirror found in /etc/apt"; return 1; }
    echo "deb $mirror $VERSION_CODENAME-backports main" > "$CACHE/backports.list"
    apt+=(-o Dir::Etc::sourcelist="$CACHE/backports.list")
    bpo=(-t "$VERSION_CODENAME-backports")
  fi
  "${apt[@]}" update
  [ ${#missing[@]} -eq 0 ] || "${apt[@]}" install -y --no-install-recommends "${bpo[@]}" "${missing[@]}" \
    >"$CACHE/apt.log" 2>&1 || { cat "$CACHE/apt.log" >&2; return 1; }
}

# Debian's kernel package, unpacked into the cache: never installed, so no /boot or hooks.
fetch_kernel() {
  [ -e "$CACHE/kernel/ok" ] && return 0
  local pkg=${NBD_GUEST_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')}
  log "fetching $pkg"
  rm -rf "$CACHE/kernel" && mkdir -p "$CACHE/kernel" && cd "$CACHE/kernel"
  apt-get download -qq -o APT::Sandbox::User=root "$pkg"
  dpkg-deb -x ./*.deb root && rm ./*.deb && rm -rf root/usr
  depmod -b root "$(ls root/lib/modules)"
  # Boot the uncompressed ELF kernel through its PVH entry: decompressing the xz bzImage takes
  # ~2.5 s under TCG. If this fails, the bzImage is booted instead.
  local z off
  z=$(ls root/boot/vmlinuz-*)
  off=$(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$z" | head -1 | cut -d: -f1) || true
  { [ -n "$off" ] && tail -c +$((off + 1)) "$z" | xz -dcq > vmlinux; } 2>/dev/null || true  # xz: trailing garbage
  [ "$(head -c 4 vmlinux 2>/dev/null)" = $'\x7fELF' ] || rm -f vmlinux
  touch ok && cd - >/dev/null
}

# A tiny initramfs: static busybox, the modules needed to reach the host's root, and /init.
build_initrd() {
  [ -e "$CACHE/initrd.img" ] && return 0
  local kv d=$CACHE/initrd.d m f
  kv=$(ls "$CACHE/kernel/root/lib/modules")
  rm -rf "$d" && mkdir -p "$d"/{bin,dev,proc,sys,mnt/lower,mnt/upper,newroot,modules}
  cp /bin/busybox "$d/bin/busybox"
  for m in $BOOT_MODULES; do modprobe -d "$CACHE/kernel/root" -S "$kv" --show-depends "$m"; done |
    awk '$1 == "insmod" && !seen[$2]++ {print $2}' | while read -r f; do
      cp "$f" "$d/modules/" && basename "$f" >> "$d/modules/order"; done
  cat > "$d/init" <<'EOF'
#!/bin/busybox sh
# Guest PID 1: mount the host's root (9p, read-only) under a tmpfs overlay and switch to it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc && mount -t sysfs sys /sys
for m in $(cat /modules/order); do insmod /modules/$m; done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /mnt/lower
mount -t tmpfs tmpfs /mnt/upper && mkdir /mnt/upper/data /mnt/upper/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/upper/data,workdir=/mnt/upper/work overlay /newroot
for m in dev proc sys; do mount --move /$m /newroot/$m; done
ip link set lo up && ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
exec switch_root /newroot /bin/sh "$NBDG_SCRIPT"   # NBDG_SCRIPT= is on the kernel command line
EOF
  chmod +x "$d/init"
  (cd "$d" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$CACHE/initrd.img.tmp"
  mv "$CACHE/initrd.img.tmp" "$CACHE/initrd.img" && rm -rf "$d"
}

setup() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/lock" && flock 9   # one setup at a time
  install_packages && fetch_kernel && build_initrd
  exec 9>&-
}

run() {
  local cmd=$1 kv kernel accel dir i=0 rc mounts='' share=()
  setup
  kv=$(ls "$CACHE/kernel/root/lib/modules")
  kernel=$CACHE/kernel/vmlinux && [ -e "$kernel" ] || kernel=$CACHE/kernel/root/boot/vmlinuz-$kv
  tmp=$(mktemp -d /tmp/nbd-guest.XXXXXX)   # the guest sees it through the shared root
  trap '[ -z "$qemu_pid$tail_pid" ] || kill $qemu_pid $tail_pid 2>/dev/null; rm -rf "$tmp"' EXIT
  trap 'exit 130' INT; trap 'exit 143' TERM
  for dir in ${NBD_GUEST_RW:-}; do
    dir=$(realpath "$dir")
    share+=(-fsdev "local,id=rw$i,path=$dir,security_model=none,multidevs=remap"
            -device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
    mounts+="mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap rw$i $(printf %q "$dir")"$'\n'
    i=$((i + 1))
  done
  printf '%s\n' "$cmd" > "$tmp/cmd"
  # The guest's PID 1 after switch_root: the host's /bin/sh runs this on the overlay root.
  cat > "$tmp/guest.sh" <<EOF
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb NBD_HOST=10.0.2.2
mount -t tmpfs tmpfs /run && mkdir -p /lib/modules/$kv
mount --bind $(printf %q "$CACHE/kernel/root/lib/modules/$kv") /lib/modules/$kv
modprobe nbd; modprobe loop   # loop: for filesystems on image files (tmpfs has no O_DIRECT)
${mounts}for p in /sys/class/virtio-ports/*; do ln -s /dev/\${p##*/} /run/\$(cat \$p/name); done
cd $(printf %q "$PWD") 2>/dev/null || cd /
bash $tmp/cmd </dev/null >/run/out 2>&1
echo \$? >/run/rc
sync
echo o >/proc/sysrq-trigger   # power off: QEMU exits
sleep 60
EOF
  accel=${NBD_GUEST_ACCEL:-}
  # A PVM /dev/kvm (module kvm_pvm, as on these machines) runs only PVM-enabled guest kernels and
  # Debian's hangs there, so that gets TCG (software emulation), as does a host without /dev/kvm.
  if [ -z "$accel" ]; then [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && accel=kvm || accel=tcg; fi
  : > "$tmp/out"; : > "$tmp/rc"
  timeout -k 5 "${NBD_GUEST_TIMEOUT:-600}" qemu-system-x86_64 \
    -machine q35 -accel "$accel" -cpu max -m "${NBD_GUEST_MEM:-1024}" -smp "${NBD_GUEST_CPUS:-2}" \
    -nodefaults -display none -no-reboot \
    -kernel "$kernel" -initrd "$CACHE/initrd.img" \
    -append "console=ttyS0 quiet panic=-1 NBDG_SCRIPT=$tmp/guest.sh" \
    -serial "file:$tmp/console.log" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot "${share[@]}" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
    -device virtio-serial-pci \
    -chardev "file,id=out,path=$tmp/out" -device virtserialport,chardev=out,name=out \
    -chardev "file,id=rc,path=$tmp/rc" -device virtserialport,chardev=rc,name=rc \
    </dev/null >"$tmp/qemu.log" 2>&1 &
  qemu_pid=$!
  tail -n +1 -s 0.2 -f --pid="$qemu_pid" "$tmp/out" & tail_pid=$!   # stream CMD's output
  wait "$qemu_pid" && rc=0 || rc=$?
  wait "$tail_pid" || true
  qemu_pid='' tail_pid=''
  [ "${NBD_GUEST_VERBOSE:-0}" != 1 ] || cat "$tmp/console.log" >&2
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "timed out after ${NBD_GUEST_TIMEOUT:-600}s ($accel)"; tail -n 20 "$tmp/console.log" >&2; return 124
  fi
  if ! [[ $(cat "$tmp/rc") =~ ^[0-9]+$ ]]; then
    log "the guest stopped before CMD finished (qemu exit $rc, $accel)"
    cat "$tmp/qemu.log" >&2; tail -n 20 "$tmp/console.log" >&2; return 125
  fi
  return "$(cat "$tmp/rc")"
}

tmp='' qemu_pid='' tail_pid=''
case "${1:-}" in
  setup) setup ;;
  run) [ $# -eq 2 ] || { echo "usage: $0 run 'CMD'" >&2; exit 2; }; run "$2" ;;
  *) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
