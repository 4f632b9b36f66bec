#!/bin/sh
# Tries what a hardened container must not be able to do, one check per argument, and
# prints one line per check: `PROBE <name>: blocked (<what happened>)` or
# `PROBE <name>: ALLOWED (<what happened>)`. Exits 0 only when every check was blocked.
#
# Checks: caps mount chown procsys rawsock dockersock rootfs setuid forkbomb.
# `forkbomb` takes the most processes it may start from FORK_CAP (default 256); it stops
# there, kills what it started and waits until they are gone.

allowed=0

blocked() { echo "PROBE $1: blocked ($2)"; }
allow() { echo "PROBE $1: ALLOWED ($2)"; allowed=$((allowed + 1)); }
# Output on one line, so each check stays one line.
flat() { printf '%s' "$1" | tr '\n' ' '; }

probe_caps() {
    eff=$(grep '^CapEff:' /proc/self/status)
    bnd=$(grep '^CapBnd:' /proc/self/status)
    eff=${eff##*[[:space:]]}
    bnd=${bnd##*[[:space:]]}
    if [ "$eff" = 0000000000000000 ] && [ "$bnd" = 0000000000000000 ]; then
        blocked caps "no capability effective or in the bounding set"
    else
        allow caps "CapEff $eff, CapBnd $bnd"
    fi
}

probe_mount() {
    dir=/tmp/probe-mount.$$
    mkdir -p "$dir" 2>/dev/null || dir=/tmp
    if out=$(mount -t tmpfs probe "$dir" 2>&1); then
        umount "$dir" 2>/dev/null
        allow mount "mounted a tmpfs on $dir"
    else
        blocked mount "$(flat "$out")"
    fi
}

probe_chown() {
    if out=$(chown 4242:4242 / 2>&1); then
        allow chown "/ now belongs to 4242"
    else
        blocked chown "$(flat "$out")"
    fi
}

probe_procsys() {
    if out=$( (echo 1 > /proc/sys/kernel/panic) 2>&1); then
        allow procsys "wrote /proc/sys/kernel/panic"
    else
        blocked procsys "$(flat "$out")"
    fi
}

# traceroute opens a raw ICMP socket (CAP_NET_RAW); ping may not need one.
probe_rawsock() {
    if out=$(traceroute -n -m 1 -q 1 -w 1 127.0.0.1 2>&1); then
        allow rawsock "traceroute opened a raw socket: $(flat "$out")"
    else
        blocked rawsock "$(flat "$out")"
    fi
}

probe_dockersock() {
    for sock in /var/run/docker.sock /run/docker.sock; do
        if [ -e "$sock" ]; then
            allow dockersock "$sock exists"
            return
        fi
    done
    blocked dockersock "no /var/run/docker.sock or /run/docker.sock"
}

probe_rootfs() {
    if out=$( (: > /probe-rootfs-write) 2>&1); then
        rm -f /probe-rootfs-write
        allow rootfs "wrote /probe-rootfs-write"
    else
        blocked rootfs "$(flat "$out")"
    fi
}

# /probe/busybox is a setuid-root copy; crontab is one of the applets busybox runs
# only with euid 0, and it says so when it did not get it.
probe_setuid() {
    if [ "$(id -u)" = 0 ]; then
        allow setuid "running as root already; run this check as another user"
        return
    fi
    out=$(/probe/busybox crontab -l 2>&1)
    case "$out" in
        *"must be suid"*) blocked setuid "the setuid-root binary ran without euid 0: $(flat "$out")" ;;
        *) allow setuid "the setuid-root binary ran with euid 0: $(flat "$out")" ;;
    esac
}

# Starts sleepers until a fork fails or FORK_CAP is reached; only shell builtins run
# in this shell meanwhile, so it never needs a fork itself while the limit bites.
probe_forkbomb() {
    cap=${FORK_CAP:-256}
    list=/tmp/probe-pids.$$
    : > "$list"
    (
        i=0
        while [ "$i" -lt "$cap" ]; do
            sleep 60 &
            echo "$!" >> "$list"
            i=$((i + 1))
        done
        echo "started $i"
    ) > /tmp/probe-fork.$$ 2>&1
    status=$?
    started=0
    while read -r pid; do
        kill -9 "$pid" 2>/dev/null
        started=$((started + 1))
    done < "$list"
    # Wait (builtins only) until every sleeper is reaped, so none outlives the check.
    while read -r pid; do
        n=0
        while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 1000000 ]; do n=$((n + 1)); done
    done < "$list"
    read -r said < /tmp/probe-fork.$$
    if [ "$status" -eq 0 ]; then
        allow forkbomb "started all $started processes (cap $cap)"
    else
        blocked forkbomb "a fork failed after $started processes: $said"
    fi
    rm -f "$list" /tmp/probe-fork.$$
}

for check in "$@"; do
    case "$check" in
        caps | mount | chown | procsys | rawsock | dockersock | rootfs | setuid | forkbomb)
            "probe_$check" ;;
        *) echo "PROBE $check: ALLOWED (unknown check)"; allowed=$((allowed + 1)) ;;
    esac
done
echo "PROBE done: $allowed allowed"
[ "$allowed" -eq 0 ]
