#!/usr/bin/env python3
"""Filesystem benchmark: native ext4, bindfs, and Brume (with and without kernel
passthrough) side by side, in one run, on one freshly made ext4 filesystem.

Usage (as root, after `cargo build --release`):
    python3 benches/fs_bench.py [--size-mib 1024] [--reps 3] [--brume target/release/brume]

Every workload runs on every target in turn, repeated --reps times with the
order rotated; the median time is reported with its ratio to native
(native time / target time: 1.0 = as fast as native, higher is better),
taken within each repetition and then the median of those.
A fresh loop-mounted ext4 image keeps the allocator state of the host out of
the figures, and each measurement starts once the Brume daemons are idle (their
background hashing of the previous target's file is not charged to the next).
Nothing here is a test: it prints numbers.

--peer NAME=COMMAND adds another FUSE filesystem to the run: COMMAND is run
with {src} and {mnt} replaced by a backing directory on the image and the mount
point, and must return once mounted, e.g.
    --peer 'hp-uring=/opt/libfuse/build/example/passthrough_hp -o io_uring {src} {mnt}'

BRUME_BENCH_CONF adds lines to the mounts' brume.conf ("\\n" for a newline),
e.g. BRUME_BENCH_CONF='[fs]\\npassthrough = true\\nthreads = 1' to compare settings.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import random

MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def wait_mounted(path, proc=None, timeout=30):
    deadline = time.time() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"mount at {path} failed to start")
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.01)


class Targets:
    """Creates native, bindfs and Brume directories on one fresh ext4 image."""

    def __init__(self, brume, work, peers=()):
        self.work = work
        self.procs = []
        self.mounts = []
        self.loop = None
        self.fs = os.path.join(work, "fs")
        try:
            self._make(brume, work, peers)
        except BaseException:
            self.close()
            raise

    def _make(self, brume, work, peers):
        self.img = os.path.join(work, "fs.img")
        os.makedirs(self.fs)
        sh("truncate", "-s", "16G", self.img)
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.img)
        # Direct I/O on the loop device: the image's writes do not pile up as dirty
        # pages of the host filesystem and throttle whichever target runs next.
        self.loop = subprocess.run(
            ["losetup", "--direct-io=on", "--find", "--show", self.img],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        sh("mount", self.loop, self.fs)
        self.mounts.append(self.fs)
        self.dirs = {}
        native = os.path.join(self.fs, "native")
        os.makedirs(native)
        self.dirs["native"] = native
        if shutil.which("bindfs"):
            src = os.path.join(self.fs, "bindfs-src")
            mnt = os.path.join(work, "bindfs")
            os.makedirs(src)
            os.makedirs(mnt)
            sh("bindfs", "--no-allow-other", src, mnt)
            wait_mounted(mnt)
            self.mounts.append(mnt)
            self.dirs["bindfs"] = mnt
        for peer in peers:
            name, _, command = peer.partition("=")
            src = os.path.join(self.fs, name + "-src")
            mnt = os.path.join(work, name)
            os.makedirs(src)
            os.makedirs(mnt)
            sh("sh", "-c", command.replace("{src}", src).replace("{mnt}", mnt))
            wait_mounted(mnt)
            self.mounts.append(mnt)
            self.dirs[name] = mnt
        conf = os.path.join(work, "brume.conf")
        with open(conf, "w") as f:
            f.write('server_url = "ws://127.0.0.1:9/"\nusername = "bench"\ncredential = "x"\n')
            f.write(os.environ.get("BRUME_BENCH_CONF", "").replace("\\n", "\n"))
        for name, extra in (("brume", []), ("brume-nopt", ["--no-passthrough"])):
            mnt = os.path.join(work, name)
            data = os.path.join(self.fs, name + "-data")
            os.makedirs(mnt)
            proc = subprocess.Popen(
                [brume, "mount", mnt, "--config", conf, "--data", data, "-f", *extra],
                stdin=subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": "warn"},
            )
            self.procs.append(proc)
            DAEMONS.append(proc.pid)
            wait_mounted(mnt, proc)
            self.mounts.append(mnt)
            group = os.path.join(mnt, "bench", "b")
            os.mkdir(group)
            self.dirs[name] = group

    def close(self):
        for m in reversed(self.mounts):
            if m == self.fs:
                continue
            subprocess.run(["fusermount3", "-u", m], check=False)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.fs in self.mounts:
            subprocess.run(["umount", self.fs], check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)


# Daemons whose background work (hashing a just-written file) must finish before
# a measurement starts, so that it is not charged to whichever target runs next.
DAEMONS = []


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def quiesce(timeout=60):
    """Waits until no daemon used CPU for 200 ms (or `timeout` passed)."""
    deadline = time.time() + timeout
    before = [cpu_ticks(p) for p in DAEMONS]
    while time.time() < deadline:
        time.sleep(0.2)
        now = [cpu_ticks(p) for p in DAEMONS]
        if now == before:
            return
        before = now


def timed(fn):
    # Start every measurement with no dirty data and no daemon busy from the
    # previous one.
    os.sync()
    quiesce()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def seq_write(d, size):
    buf = b"\xa5" * MIB
    p = os.path.join(d, "seq")

    def run():
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for _ in range(size // MIB):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)

    # Untimed first: on this kind of VM, a target's first write after another
    # target wrote runs 2-3x slower, whichever target it is, so timing it would
    # measure the order of the run rather than the filesystem.
    run()
    return timed(run)


# A warm read of 1 GiB takes some 50 ms: read it this many times per
# measurement, so that a scheduling hiccup does not decide the ratio.
WARM_PASSES = 4


def seq_read(d, size, cold):
    p = os.path.join(d, "seq")
    if cold:
        drop_caches()
        return timed(lambda: seq_read_once(p))
    seq_read_once(p)
    return timed(lambda: [seq_read_once(p) for _ in range(WARM_PASSES)])


def seq_read_once(p):
    fd = os.open(p, os.O_RDONLY)
    while os.read(fd, MIB):
        pass
    os.close(fd)


def create_stat(d, n, rep):
    sub = os.path.join(d, f"cs{rep}")
    os.mkdir(sub)
    buf = b"x" * 4096

    def run():
        for i in range(n):
            p = f"{sub}/f{i}"
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, buf)
            os.close(fd)
            os.stat(p)

    return timed(run)


def small_fsync(d, n, rep):
    """What a database does: 4 KiB written in place, then fsync, n times."""
    p = os.path.join(d, f"db{rep}")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"y" * 65536, 0)
    os.fsync(fd)
    buf = b"z" * 4096

    def run():
        for i in range(n):
            os.pwrite(fd, buf, (i % 16) * 4096)
            os.fsync(fd)

    try:
        return timed(run)
    finally:
        os.close(fd)


def warm_stat(d, n, rep):
    sub = os.path.join(d, f"cs{rep}")
    names = [f"{sub}/f{i}" for i in range(n)]
    for p in names:
        os.stat(p)
    return timed(lambda: [os.stat(p) for p in names for _ in range(3)])


def make_tarball(path, files):
    rng = random.Random(42)
    src = path + ".src"
    os.makedirs(src)
    for i in range(files):
        d = os.path.join(src, f"d{i % 97}", f"e{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.txt"), "wb") as f:
            f.write(rng.randbytes(rng.choice([0, 100, 1000, 3000, 8000, 20000])))
    with tarfile.open(path, "w") as t:
        t.add(src, arcname="tree")
    shutil.rmtree(src)


def tar_x(d, tarball, rep):
    dest = os.path.join(d, f"tar{rep}")
    os.mkdir(dest)
    return timed(lambda: sh("tar", "-xf", tarball, "-C", dest))


def paired_ratio(base, other):
    """Median over repetitions of base time / other time within one repetition:
    the machine's speed drifts over a run, and a ratio of two medians taken
    minutes apart would carry that drift."""
    return statistics.median(b / o for b, o in zip(base, other))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brume", default="target/release/brume")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--tar-files", type=int, default=5000)
    ap.add_argument("--fsyncs", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--targets", default="",
                    help="comma-separated targets to measure (default: all); native is always in")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                    help="another FUSE filesystem to mount and measure")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop mounts, drop_caches)")
    brume = os.path.abspath(args.brume)
    work = tempfile.mkdtemp(prefix="brume-bench-")
    targets = Targets(brume, work, args.peer)
    tarball = os.path.join(work, "tree.tar")
    make_tarball(tarball, args.tar_files)
    size = args.size_mib * MIB
    workloads = [
        (f"seq write {args.size_mib} MiB + fsync", lambda d, r: seq_write(d, size), "MB/s", size),
        (f"seq read {args.size_mib} MiB, cold", lambda d, r: seq_read(d, size, True), "MB/s", size),
        (f"seq read {args.size_mib} MiB, warm", lambda d, r: seq_read(d, size, False), "MB/s", size * WARM_PASSES),
        (f"create+stat {args.files} x 4 KiB", lambda d, r: create_stat(d, args.files, r), "files/s", args.files),
        (f"db: 4 KiB pwrite + fsync x {args.fsyncs}", lambda d, r: small_fsync(d, args.fsyncs, r), "fsyncs/s", args.fsyncs),
        (f"warm stat {args.files} x 3", lambda d, r: warm_stat(d, args.files, r), "stats/s", args.files * 3),
        (f"tar x {args.tar_files} files", lambda d, r: tar_x(d, tarball, r), "files/s", args.tar_files),
    ]
    if args.only:
        keep = args.only.split(",")
        workloads = [w for w in workloads if any(k in w[0] for k in keep)]
    names = list(targets.dirs)
    if args.targets:
        keep = set(args.targets.split(",")) | {"native"}
        names = [n for n in names if n in keep]
    results = {}
    try:
        for title, fn, unit, amount in workloads:
            times = {n: [] for n in names}
            for rep in range(args.reps):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for n in order:
                    times[n].append(fn(targets.dirs[n], rep))
            results[title] = (unit, amount, times)
            line = f"{title}: " + ", ".join(
                f"{n} {statistics.median(times[n]):.3f}s "
                f"[{' '.join(f'{t:.3f}' for t in times[n])}]"
                for n in names
            )
            print(line, file=sys.stderr, flush=True)
    finally:
        targets.close()
        shutil.rmtree(work, ignore_errors=True)

    uname = os.uname()
    print(f"machine: {os.cpu_count()} cores, {uname.sysname} {uname.release}; reps={args.reps}, median\n")
    header = "| workload | " + " | ".join(names) + " |"
    print(header)
    print("|" + "---|" * (len(names) + 1))
    for title, (unit, amount, times) in results.items():
        med = {n: statistics.median(t) for n, t in times.items()}
        cells = []
        for n in names:
            rate = amount / med[n]
            rate_s = f"{rate / 1e6:.0f} MB/s" if unit == "MB/s" else f"{rate:,.0f} {unit}"
            ratio = paired_ratio(times["native"], times[n])
            cells.append(f"{rate_s} ({ratio:.2f}x)")
        print(f"| {title} | " + " | ".join(cells) + " |")
    if "bindfs" in names and "brume" in names:
        print()
        for title, (_, _, times) in results.items():
            ratio = paired_ratio(times["bindfs"], times["brume"])
            print(f"{title}: brume is {ratio:.2f}x the speed of bindfs")


if __name__ == "__main__":
    main()
