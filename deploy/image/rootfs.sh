#!/usr/bin/env bash
# Assemble the runtime filesystem of a Warden node image in a directory: the one
# layout both image builds use (the Dockerfile's builder stage and build.sh), so the
# image tested here by smoke.sh is the image the Dockerfile produces.
#
#   deploy/image/rootfs.sh BINARY DEST
#
# DEST gets:
#   /usr/local/bin/warden-node   BINARY, debug info stripped (symbols kept for backtraces)
#   /lib/..., /lib64/...         exactly the shared libraries `ldd BINARY` lists, and the
#                                dynamic loader, as regular files at the paths ldd prints
#   /etc/passwd, /etc/group      root and the non-root user `nonroot` (uid/gid 65532, as
#                                in distroless), no login shell
#   /etc/nsswitch.conf           `hosts: files dns` (glibc >= 2.34 has both built in)
#   /tmp                         empty, 1777 (the node writes no files; for handlers that do)
#
# Nothing else: no shell, no package manager, no CA bundle (the node's PostgreSQL
# TLS is rustls with Mozilla's roots compiled in; its gRPC TLS reads the files you mount).
set -euo pipefail

bin="${1:?usage: rootfs.sh BINARY DEST}"
dest="${2:?usage: rootfs.sh BINARY DEST}"
[ -x "$bin" ] || { echo "rootfs.sh: $bin is not an executable file" >&2; exit 1; }
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
    echo "rootfs.sh: $dest exists and is not empty" >&2
    exit 1
fi

mkdir -p "$dest/usr/local/bin" "$dest/etc" "$dest/tmp"
chmod 0755 "$dest" "$dest/usr" "$dest/usr/local" "$dest/usr/local/bin" "$dest/etc"
chmod 1777 "$dest/tmp"

install -m 0755 "$bin" "$dest/usr/local/bin/warden-node"
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$dest/usr/local/bin/warden-node"
else
    echo "rootfs.sh: no strip (binutils); keeping debug info" >&2
fi

# Shared libraries. ldd lines look like
#   libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
#   /lib64/ld-linux-x86-64.so.2 (0x...)
#   linux-vdso.so.1 (0x...)                 (in the kernel: nothing to copy)
# A statically linked binary needs none (ldd says so and exits non-zero).
if ldd_out="$(ldd "$bin" 2>&1)"; then
    while IFS= read -r line; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            *"=> not found"*) echo "rootfs.sh: missing library: $line" >&2; exit 1 ;;
            *"=> /"*) path="${line#*=> }"; path="${path%% (*}" ;;
            /*) path="${line%% (*}" ;;
            *) continue ;;
        esac
        # Regular files at the printed paths (e.g. /lib64/ld-linux-x86-64.so.2 is a
        # symlink on the build host; in the image it is the file itself).
        install -D -m 0755 "$(readlink -f "$path")" "$dest$path"
    done <<<"$ldd_out"
else
    case "$ldd_out" in
        *"not a dynamic executable"* | *"statically linked"*) ;;
        *) echo "rootfs.sh: ldd $bin failed: $ldd_out" >&2; exit 1 ;;
    esac
fi

cat >"$dest/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
PASSWD
cat >"$dest/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
cat >"$dest/etc/nsswitch.conf" <<'NSS'
passwd: files
group: files
hosts: files dns
NSS
chmod 0644 "$dest/etc/passwd" "$dest/etc/group" "$dest/etc/nsswitch.conf"

# Directories created by install -D follow the umask; make them 0755 like a distro's.
find "$dest" -type d ! -path "$dest/tmp" -exec chmod 0755 {} +
