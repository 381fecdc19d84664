#!/usr/bin/env python3
"""Group sync, owner -> member: Brume against Syncthing, side by side in one run.

Both systems run on this machine at the same time, each with two endpoints
(Brume: a signaling server and two mounts, alice = owner, bob = member;
Syncthing: two instances, A with a send-only folder shared to B's receive-only
folder), everything on loopback. Each workload is run on Brume and then on
Syncthing (latency repetitions alternate), and both figures are printed with their
ratio.

Workloads, run in the order of --only (default new,many,bulk,edit), each timed from
the close of the last write at the owner; many and bulk each start with a fresh
Brume member (see Brume.begin) and their own Syncthing subdirectory:
  new-file   a new 4 KiB file, until the member reads its full content
             (polled every ~1 ms); p50/p90 over --reps.
  bulk       a new 1 GiB file (random bytes), until the member has all of it
             (Brume: size visible and every block cached, per the
             user.brume.cached xattr; Syncthing: the final name with the full size,
             written through a temp file); then its SHA-256 is checked once.
  edit       one byte changed in the middle (offset 512 MiB) of that file, until
             the member reads the new byte; bytes exchanged for it.
  many       10,000 x 4 KiB files in 100 directories, until all are listed at the
             member with the right size (Brume also: until all are cached); peak
             RSS of both daemons of each system during it.
  reconnect  (Brume only; Syncthing is not started if it is the only workload)
             a group of --reconnect-files x 1 KiB files in 200 directories, fully at
             the member; then, for 1 and for 1,000 changed files: the member's
             daemon stops, the owner rewrites that many files, the member mounts
             again; the time from its start until it reads the last of them, and
             the bytes it received from the owner (its peer counters, which start
             at 0 with the daemon), next to the bytes of the first full sync.

As root (FUSE mounts; Brume uses passthrough as root), from the repository root:

  cargo build --release --bin brume
  python3 benches/sync_bench.py --brume target/release/brume [--reps 5] [--timeout 600]

Data lives in /tmp/brume-syncbench-*, removed at the end (--keep keeps it).
Syncthing (Debian's 1.19 package) is configured offline: GUI/REST and sync on
127.0.0.1 only, no discovery, relays, NAT traversal, STUN, usage or crash
reporting, upgrades; each device knows the other's explicit tcp://127.0.0.1:PORT.
"""

import argparse
import atexit
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

now = time.perf_counter


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# cleanup: every process we start and every mount we make is undone at exit
# ----------------------------------------------------------------------------

PROCS = []  # (name, Popen)
MOUNTS = []  # mountpoints
ROOT = None
KEEP = False


def is_mounted(path):
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == path for line in f)
    except OSError:
        return False


def cleanup():
    for m in reversed(MOUNTS):
        if is_mounted(m):
            subprocess.run(["fusermount3", "-u", m], stderr=subprocess.DEVNULL)
    for m in reversed(MOUNTS):
        if is_mounted(m):
            subprocess.run(["fusermount3", "-uz", m], stderr=subprocess.DEVNULL)
    MOUNTS.clear()
    for name, p in reversed(PROCS):
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.time() + 15
    for name, p in reversed(PROCS):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) did not stop; killing it")
            p.kill()
            p.wait()
    PROCS.clear()
    if ROOT and os.path.isdir(ROOT) and not KEEP:
        shutil.rmtree(ROOT, ignore_errors=True)


def on_signal(signum, _frame):
    raise SystemExit(f"interrupted by signal {signum}")


def spawn(name, argv, **kw):
    p = subprocess.Popen(argv, **kw)
    PROCS.append((name, p))
    return p


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def wait_until(pred, timeout, interval, what):
    deadline = now() + timeout
    while now() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def settle_wait(name, done, timeout):
    """Waits until the member has everything (True), or gives up after `timeout`."""
    try:
        wait_until(done, timeout, 0.5, f"{name} member to settle")
        return True
    except TimeoutError as e:
        log(f"{e}; carrying on")
        return False


def pct(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    return None


def lo_bytes():
    """Bytes received on the loopback interface (each loopback packet counts once)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    return 0


class RssSampler:
    """Samples VmRSS of some pids every 20 ms in a thread; max per pid."""

    def __init__(self, pids):
        self.pids = dict(pids)
        self.peak = {k: 0 for k in self.pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                v = proc_status(pid, "VmRSS")
                if v and v > self.peak[k]:
                    self.peak[k] = v
            self._stop.wait(0.02)

    def __enter__(self):
        for pid in self.pids.values():
            # Resets VmHWM to the current RSS (root only): the peak is then this run's.
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        for k, pid in self.pids.items():
            hwm = proc_status(pid, "VmHWM") or 0
            self.peak[k] = max(self.peak[k], hwm)


def children(pid):
    """Pids whose parent is `pid` (any of its threads may have forked them)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            if int(st.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(d))
    return sorted(kids)


def sockets_of(pid):
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        pass
    return inodes


def _hex_addr(h):
    ip, port = h.split(":")
    port = int(port, 16)
    if len(ip) == 8:
        addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip)[::-1])
    else:
        raw = bytes.fromhex(ip)
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        addr = socket.inet_ntop(socket.AF_INET6, raw)
    return addr, port


def non_loopback_sockets(pids):
    """Internet sockets of `pids` bound to or talking to anything but loopback."""
    want = set()
    for pid in pids:
        want |= sockets_of(pid)
    bad = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{proto}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[9] not in want:
                        continue
                    local, remote = _hex_addr(parts[1]), _hex_addr(parts[2])
                    for addr, _port in (local, remote):
                        if addr in ("0.0.0.0", "::") and (addr, _port) == remote:
                            continue  # no peer
                        if not (addr.startswith("127.") or addr == "::1" or addr.startswith("::ffff:127.")):
                            bad.append(f"{proto} {local[0]}:{local[1]} -> {remote[0]}:{remote[1]}")
                            break
        except OSError:
            pass
    return bad


# ----------------------------------------------------------------------------
# Brume
# ----------------------------------------------------------------------------


class Brume:
    name = "brume"

    def __init__(self, binary, root):
        self.bin = os.path.realpath(binary)
        self.root = os.path.join(root, "brume")
        os.makedirs(self.root)
        self.users = {}

    def setup(self):
        db = os.path.join(self.root, "server.db")
        slog = open(os.path.join(self.root, "server.log"), "wb")
        self.server = spawn(
            "brume server",
            [self.bin, "server", "--listen", "127.0.0.1:0", "--db", db],
            stdout=subprocess.PIPE,
            stderr=slog,
        )
        line = self.server.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"brume server did not start: {line!r}")
        self.url = line.split("listening on", 1)[1].strip()
        log(f"brume: signaling server {self.url}")
        for user in ("alice", "bob"):
            d = os.path.join(self.root, user)
            mnt, data, conf = os.path.join(d, "Brume"), os.path.join(d, "data"), os.path.join(d, "brume.conf")
            os.makedirs(mnt)
            text = subprocess.run(
                [self.bin, "server", "add-user", user, "--db", db, "--url", self.url],
                check=True,
                capture_output=True,
            ).stdout
            # Everything stays on loopback: the peer link binds 127.0.0.1 only.
            text = re.sub(rb"(?m)^udp_addrs = .*$", b'udp_addrs = ["127.0.0.1:0"]', text)
            if b"udp_addrs" not in text:
                raise RuntimeError("add-user printed no udp_addrs line to restrict")
            with open(conf, "wb") as f:
                f.write(text)
            os.chmod(conf, 0o600)
            self.users[user] = dict(mnt=mnt, data=data, conf=conf, dir=d)
            self.mount(user)
        a, b = self.users["alice"]["mnt"], self.users["bob"]["mnt"]
        self.owner = os.path.join(a, "alice", "g")
        self.member = os.path.join(b, "alice", "g")
        os.mkdir(self.owner)
        write_file(os.path.join(self.owner, ".members"), b"bob\n")
        os.makedirs(self.member, exist_ok=True)
        write_file(os.path.join(self.owner, "ready"), b"ready\n")
        t = now()
        wait_until(lambda: read_or_none(os.path.join(self.member, "ready")) == b"ready\n", 60, 0.01, "bob to join alice/g")
        log(f"brume: bob joined alice/g and got a first file in {(now() - t) * 1000:.0f} ms")
        self.group = "g"

    def mount(self, user):
        u = self.users[user]
        mnt, d = u["mnt"], u["dir"]
        mlog = open(os.path.join(d, "mount.log"), "ab")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        if mnt not in MOUNTS:
            MOUNTS.append(mnt)
        p = spawn(
            f"brume mount ({user})",
            [self.bin, "mount", "-f", mnt, "--config", u["conf"], "--data", u["data"]],
            stdout=mlog,
            stderr=subprocess.STDOUT,
            env=env,
        )
        u["proc"] = p
        wait_until(lambda: is_mounted(mnt) or p.poll() is not None, 30, 0.02, f"{user}'s mount")
        if p.poll() is not None:
            raise RuntimeError(f"brume mount for {user} exited ({p.returncode}); see {d}/mount.log")

    def begin(self, workload):
        """A fresh member for each workload: alice makes group g-WORKLOAD, bob's daemon
        is stopped, its data wiped (but for its identity key), and it mounts again and joins only that group, so
        what an earlier workload left queued cannot slow this one down."""
        group = f"g-{workload}"
        self.owner = os.path.join(self.users["alice"]["mnt"], "alice", group)
        os.mkdir(self.owner)
        write_file(os.path.join(self.owner, ".members"), b"bob\n")
        write_file(os.path.join(self.owner, "ready"), b"ready\n")
        u = self.users["bob"]
        subprocess.run(["fusermount3", "-u", u["mnt"]], check=True)
        try:
            u["proc"].wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("bob's daemon did not exit 30 s after the unmount; killing it")
            u["proc"].kill()
            u["proc"].wait()
        # Everything but its identity key (which the server and alice have pinned).
        for name in os.listdir(u["data"]):
            if name != "identity.key":
                path = os.path.join(u["data"], name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        self.mount("bob")
        self.member = os.path.join(u["mnt"], "alice", group)
        os.makedirs(self.member, exist_ok=True)
        t = now()
        wait_until(lambda: read_or_none(os.path.join(self.member, "ready")) == b"ready\n", 60, 0.01,
                   f"a fresh bob to join alice/{group}")
        log(f"brume: a fresh bob joined alice/{group} in {(now() - t) * 1000:.0f} ms")
        self.group = group

    def pids(self):
        return {"owner": self.users["alice"]["proc"].pid, "member": self.users["bob"]["proc"].pid}

    def all_pids(self):
        return [self.server.pid] + [u["proc"].pid for u in self.users.values()]

    def status(self, user):
        u = self.users[user]
        out = subprocess.run(
            [self.bin, "status", "--json", "--config", u["conf"], "--data", u["data"]],
            check=True,
            capture_output=True,
        ).stdout
        return json.loads(out)

    def wire_bytes(self):
        """Bytes bob exchanged with alice (frames sent + received), per bob's live status.
        The daemon rewrites it once a second."""
        live = self.status("bob").get("live") or {}
        p = (live.get("peers") or {}).get("alice") or {}
        return int(p.get("bytes_sent", 0)) + int(p.get("bytes_received", 0)), live.get("updated_unix")

    def cached(self, path):
        have, total = self.progress(path)
        return total is not None and have == total

    def progress(self, path):
        """(blocks cached, blocks) of a mirrored file, per its user.brume.cached xattr."""
        try:
            v = os.getxattr(path, "user.brume.cached").decode()
        except OSError:
            return 0, None
        have, total = v.split("/")
        return int(have), int(total)

    def settle(self, timeout=120):
        """Waits until bob's cache holds everything alice's group has."""
        def done():
            g = ((self.status("bob").get("live") or {}).get("groups") or {}).get(f"alice/{self.group}")
            return g and g["files_done"] == g["files_total"] and g["bytes_done"] == g["bytes_total"]
        return settle_wait(self.name, done, timeout)


# ----------------------------------------------------------------------------
# Syncthing
# ----------------------------------------------------------------------------

FOLDER = "bench"


class Syncthing:
    name = "syncthing"

    def __init__(self, binary, root, delay):
        self.bin = binary
        self.root = os.path.join(root, "syncthing")
        os.makedirs(self.root)
        self.delay = delay
        self.nodes = {}

    def rest(self, node, method, path, body=None, timeout=30):
        n = self.nodes[node]
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{n['gui']}{path}",
            data=data,
            method=method,
            headers={"X-API-Key": n["apikey"], "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
        return json.loads(text) if text.strip() else None

    def setup(self):
        for node in ("A", "B"):
            home = os.path.join(self.root, node, "home")
            folder = os.path.join(self.root, node, "folder")
            os.makedirs(folder)
            out = subprocess.run(
                [self.bin, "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"],
                check=True,
                capture_output=True,
                text=True,
            )
            devid = next(
                l.split("Device ID:")[1].strip() for l in (out.stdout + out.stderr).splitlines() if "Device ID:" in l
            )
            self.nodes[node] = dict(
                home=home, folder=folder, id=devid, gui=free_port(), port=free_port(),
                apikey="bench-" + os.urandom(12).hex(),
            )
        for node, other in (("A", "B"), ("B", "A")):
            self.write_config(node, other)
        env = dict(os.environ, STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1")
        for node in ("A", "B"):
            n = self.nodes[node]
            n["proc"] = spawn(
                f"syncthing {node}",
                [self.bin, "serve", f"--home={n['home']}", "--no-browser", "--no-restart", "--no-upgrade",
                 f"--logfile={os.path.join(self.root, node, 'syncthing.log')}", "--log-max-old-files=0"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        for node in ("A", "B"):
            def up(node=node):
                try:
                    return self.rest(node, "GET", "/rest/system/ping", timeout=2).get("ping") == "pong"
                except OSError:
                    return self.nodes[node]["proc"].poll() is not None
            wait_until(up, 60, 0.1, f"syncthing {node} REST API")
            if self.nodes[node]["proc"].poll() is not None:
                raise RuntimeError(f"syncthing {node} exited; see {self.root}/{node}/syncthing.log")
        t = now()
        wait_until(self.connected, 60, 0.1, "the two syncthing instances to connect")
        log(f"syncthing: A and B connected in {(now() - t) * 1000:.0f} ms")
        self.owner, self.member = self.nodes["A"]["folder"], self.nodes["B"]["folder"]
        for node in ("A", "B"):
            wait_until(lambda node=node: self.folder_state(node) == "idle", 60, 0.1, f"syncthing {node} folder idle")
        write_file(os.path.join(self.owner, "ready"), b"ready\n")
        t = now()
        wait_until(lambda: read_or_none(os.path.join(self.member, "ready")) == b"ready\n", 120, 0.01, "syncthing B first file")
        log(f"syncthing: first file reached B in {(now() - t) * 1000:.0f} ms")

    def write_config(self, node, other):
        n, o = self.nodes[node], self.nodes[other]
        path = os.path.join(n["home"], "config.xml")
        tree = ET.parse(path)
        cfg = tree.getroot()
        gui = cfg.find("gui")
        gui.set("tls", "false")
        gui.find("address").text = f"127.0.0.1:{n['gui']}"
        gui.find("apikey").text = n["apikey"]
        opts = cfg.find("options")

        def opt(key, value):
            e = opts.find(key)
            if e is None:
                e = ET.SubElement(opts, key)
            e.text = str(value)

        for e in opts.findall("listenAddress"):
            opts.remove(e)
        ET.SubElement(opts, "listenAddress").text = f"tcp://127.0.0.1:{n['port']}"
        for k, v in [
            ("globalAnnounceEnabled", "false"),
            ("localAnnounceEnabled", "false"),
            ("relaysEnabled", "false"),
            ("natEnabled", "false"),
            ("urAccepted", "-1"),
            ("urSeen", "3"),
            ("crashReportingEnabled", "false"),
            ("autoUpgradeIntervalH", "0"),
            ("startBrowser", "false"),
            ("announceLANAddresses", "false"),
            ("stunKeepaliveStartS", "0"),
            ("stunKeepaliveMinS", "0"),
            ("stunServer", ""),
            ("releasesURL", "http://127.0.0.1:1/"),
            ("urURL", "http://127.0.0.1:1/"),
            ("crashReportingURL", "http://127.0.0.1:1/"),
            ("reconnectionIntervalS", "1"),
        ]:
            opt(k, v)
        for e in opts.findall("globalAnnounceServer"):
            opts.remove(e)
        # Devices: ourselves (from generate) and the other, at its explicit address.
        me = cfg.find("device")
        me.find("address").text = "dynamic"
        dev = ET.Element("device", id=o["id"], name=other, compression="metadata", introducer="false",
                         skipIntroductionRemovals="false", introducedBy="")
        ET.SubElement(dev, "address").text = f"tcp://127.0.0.1:{o['port']}"
        ET.SubElement(dev, "paused").text = "false"
        ET.SubElement(dev, "autoAcceptFolders").text = "false"
        cfg.insert(list(cfg).index(me) + 1, dev)
        # The folder: send-only on A, receive-only on B; defaults otherwise.
        folder = ET.Element("folder", id=FOLDER, label=FOLDER, path=n["folder"],
                            type="sendonly" if node == "A" else "receiveonly",
                            rescanIntervalS="3600", fsWatcherEnabled="true",
                            fsWatcherDelayS=str(self.delay), ignorePerms="false", autoNormalize="true")
        ET.SubElement(folder, "filesystemType").text = "basic"
        for d in (n["id"], o["id"]):
            ET.SubElement(folder, "device", id=d, introducedBy="")
        # Everything else as in the defaults section.
        defaults = cfg.find("defaults/folder")
        for child in defaults:
            if child.tag not in ("filesystemType", "device"):
                folder.append(child)
        cfg.insert(0, folder)
        tree.write(path)

    def connected(self):
        try:
            c = self.rest("A", "GET", "/rest/system/connections", timeout=2)
        except OSError:
            return False
        return c["connections"].get(self.nodes["B"]["id"], {}).get("connected")

    def folder_state(self, node):
        return self.rest(node, "GET", f"/rest/db/status?folder={FOLDER}").get("state")

    def daemon_pid(self, node):
        """The process doing the work (the child if a monitor process runs)."""
        pid = self.nodes[node]["proc"].pid
        kids = children(pid)
        return kids[0] if kids else pid

    def pids(self):
        return {"owner": self.daemon_pid("A"), "member": self.daemon_pid("B")}

    def all_pids(self):
        return [self.nodes[n]["proc"].pid for n in self.nodes] + [self.daemon_pid(n) for n in self.nodes]

    def wire_bytes(self):
        c = self.rest("B", "GET", "/rest/system/connections")["connections"][self.nodes["A"]["id"]]
        return int(c["inBytesTotal"]) + int(c["outBytesTotal"]), None

    def cached(self, path):
        return True

    def progress(self, path):
        return None, None

    def settle(self, timeout=120):
        def done():
            c = self.rest("A", "GET", f"/rest/db/completion?folder={FOLDER}&device={self.nodes['B']['id']}")
            return c.get("completion") == 100 and c.get("needItems", 0) == 0 and self.folder_state("B") == "idle"
        return settle_wait(self.name, done, timeout)

    def begin(self, workload):
        """Each workload in its own subdirectory of the shared folder."""
        self.owner = os.path.join(self.nodes["A"]["folder"], workload)
        self.member = os.path.join(self.nodes["B"]["folder"], workload)
        os.mkdir(self.owner)

    def set_delay(self, secs):
        self.rest("A", "PATCH", f"/rest/config/folders/{FOLDER}", {"fsWatcherDelayS": secs})
        time.sleep(1)
        wait_until(lambda: self.folder_state("A") == "idle", 60, 0.1, "syncthing A folder idle")


# ----------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------


def new_file_once(sys_, i, tag, timeout=120):
    data = os.urandom(4 * KIB)
    name = f"new-{tag}-{i}.bin"
    dst = os.path.join(sys_.member, name)
    write_file(os.path.join(sys_.owner, name), data)
    t0 = now()
    while True:
        if read_or_none(dst) == data:
            return now() - t0
        if now() - t0 > timeout:
            raise TimeoutError(f"{sys_.name}: {name} did not arrive in {timeout} s")
        time.sleep(0.001)


def bench_new_file(systems, reps, tag="n"):
    res = {s.name: [] for s in systems}
    for i in range(reps):
        for s in systems:
            res[s.name].append(new_file_once(s, i, tag))
            time.sleep(0.3)
    return res


def bench_bulk(systems, src, src_hash, size, timeout):
    res = {}
    for s in systems:
        path = os.path.join(s.owner, "big.bin")
        dst = os.path.join(s.member, "big.bin")
        t_w = now()
        with open(src, "rb") as fi, open(path, "wb") as fo:
            while True:
                b = fi.read(MIB)
                if not b:
                    break
                fo.write(b)
        t0 = now()
        write_s = t0 - t_w

        def sized():
            try:
                return os.stat(dst).st_size == size
            except OSError:
                return False

        res[s.name] = r = dict(write_s=write_s, size_s=None, secs=None, mbps=None, ok=None, partial=None)
        try:
            wait_until(sized, timeout, 0.005, f"{s.name}: big.bin size at the member")
            r["size_s"] = now() - t0
            wait_until(lambda: s.cached(dst), max(1, timeout - (now() - t0)), 0.005,
                       f"{s.name}: big.bin content at the member")
        except TimeoutError as e:
            el = now() - t0
            have, total = s.progress(dst)
            if have is not None and total:
                got = have * 256 * KIB
                r["partial"] = dict(after_s=el, blocks=have, of=total, mbps=got / el / 1e6)
            log(f"{e}; progress {have}/{total} blocks")
            continue
        t_all = now() - t0
        t_v = now()
        ok = sha256_file(dst) == src_hash
        verify_s = now() - t_v
        r.update(secs=t_all, mbps=size / t_all / 1e6, ok=ok, verify_s=verify_s)
        log(f"{s.name}: bulk {size >> 20} MiB: size at +{r['size_s']:.2f} s, complete at +{t_all:.2f} s "
            f"({size / t_all / 1e6:.0f} MB/s), sha256 {'ok' if ok else 'MISMATCH'} (verify {verify_s:.1f} s)")
        s.settle()
        time.sleep(1)
    return res


def bench_edit(systems, offset, timeout):
    res = {}
    for s in systems:
        path = os.path.join(s.owner, "big.bin")
        dst = os.path.join(s.member, "big.bin")
        s.settle(timeout=60)
        time.sleep(2.5)  # let idle counters and the status file settle
        w0, _ = s.wire_bytes()
        lo0 = lo_bytes()
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            new = bytes([old[0] ^ 0xFF])
            f.seek(offset)
            f.write(new)
        t0 = now()

        def seen():
            try:
                with open(dst, "rb") as f:
                    f.seek(offset)
                    return f.read(1) == new
            except OSError:
                return False

        secs = None
        while not seen():
            if now() - t0 > timeout:
                log(f"{s.name}: the edit was not seen at the member after {timeout} s")
                break
            time.sleep(0.001)
        else:
            secs = now() - t0
        s.settle(timeout=30)
        time.sleep(2.5)  # in-flight messages, and Brume's once-a-second status file
        lo1 = lo_bytes()
        w1, _ = s.wire_bytes()
        res[s.name] = dict(secs=secs, wire=w1 - w0, lo=lo1 - lo0)
        log(f"{s.name}: 1-byte edit seen after {secs_or(secs)}; {w1 - w0} B counted by the daemon, "
            f"{lo1 - lo0} B on lo in the window")
    return res


def bench_many(systems, dirs, per_dir, fsize, timeout):
    res = {}
    for s in systems:
        base_o = os.path.join(s.owner, "many")
        base_m = os.path.join(s.member, "many")
        paths = [(f"d{d:03}", f"f{f:03}.bin") for d in range(dirs) for f in range(per_dir)]
        pids = s.pids()
        with RssSampler(pids) as rss:
            t_w = now()
            os.mkdir(base_o)
            for d in range(dirs):
                os.mkdir(os.path.join(base_o, f"d{d:03}"))
            payloads = {}
            for d, f in paths:
                data = os.urandom(fsize)
                payloads[(d, f)] = data[:16]
                write_file(os.path.join(base_o, d, f), data)
            t0 = now()
            write_s = t0 - t_w
            # As `ls -l` would: list each directory not yet complete, stat what is there.
            want = {}
            for d, f in paths:
                want.setdefault(d, set()).add(f)
            pending = dict(want)
            present = {}
            last = now()
            listed = complete = None
            while pending:
                if now() - last > 10:
                    last = now()
                    log(f"{s.name}: +{now() - t0:.0f} s, {len(pending)} directories incomplete at the member")
                for d in list(pending):
                    try:
                        with os.scandir(os.path.join(base_m, d)) as it:
                            have = {e.name for e in it if e.name in want[d] and e.stat().st_size == fsize}
                    except OSError:
                        continue
                    present[d] = len(have)
                    if have >= want[d]:
                        del pending[d]
                if pending:
                    if now() - t0 > timeout:
                        log(f"{s.name}: gave up after {timeout} s with {len(pending)} directories incomplete")
                        break
                    time.sleep(0.02)
            if not pending:
                listed = now() - t0
                pending = [os.path.join(base_m, d, f) for d, f in paths]
                while pending:
                    pending = [p for p in pending if not s.cached(p)]
                    if pending:
                        if now() - t0 > timeout:
                            log(f"{s.name}: gave up after {timeout} s with {len(pending)} files not cached")
                            break
                        time.sleep(0.05)
                if not pending:
                    complete = now() - t0
        sample = random.Random(7).sample(paths, 100)
        ok = complete is not None and all((read_or_none(os.path.join(base_m, d, f)) or b"")[:16] == payloads[(d, f)] for d, f in sample)
        n = len(paths)
        res[s.name] = dict(write_s=write_s, listed=listed, complete=complete, ok=ok,
                           present=sum(present.values()), timeout=timeout,
                           rss_member=rss.peak["member"], rss_owner=rss.peak["owner"], n=n)
        log(f"{s.name}: {n} files written in {write_s:.2f} s; all listed at the member at +{secs(listed)}, "
            f"all content at +{secs(complete)}; content sample {'ok' if ok else 'MISMATCH'}; peak RSS member "
            f"{rss.peak['member'] / MIB:.1f} MiB, owner {rss.peak['owner'] / MIB:.1f} MiB")
        if complete is not None:
            s.settle()
    return res


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------


def secs(v):
    return f"{v:.2f} s" if v is not None else "not done (timeout)"


def secs_or(v):
    return fmt_ms(v) if v is not None else "not seen (timeout)"


def ratio(a, b):
    return f"{a / b:.3f}x time" if a is not None and b else "-"


def fmt_ms(s):
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def bench_reconnect(b, files, timeout):
    """Bytes and time for a member to catch up after 1 and after 1,000 changes."""
    b.begin("reconnect")
    u = b.users["bob"]
    dirs = 200
    per = max(1, files // dirs)
    t = now()
    for d in range(dirs):
        os.mkdir(os.path.join(b.owner, f"d{d}"))
        for f in range(per):
            write_file(os.path.join(b.owner, f"d{d}", f"f{f}"), b"%d/%d " % (d, f) + b"x" * 1000)
    log(f"brume: wrote {dirs * per} files in {now() - t:.1f} s")
    last = os.path.join(b.member, f"d{dirs - 1}", f"f{per - 1}")
    wait_until(lambda: os.path.exists(last), timeout, 0.05, "the group at bob")
    b.settle(timeout)
    time.sleep(1.5)  # the live status is rewritten once a second
    join_bytes = received_from_alice(b)
    alice_log = os.path.join(b.users["alice"]["dir"], "mount.log")
    runs = []
    for n in (1, 1000):
        subprocess.run(["fusermount3", "-u", u["mnt"]], check=True)
        u["proc"].wait(timeout=30)
        before = subscriptions(alice_log)
        changed = []
        for i in range(n):
            d, f = i % dirs, (i // dirs) % per
            path = os.path.join(b.owner, f"d{d}", f"f{f}")
            body = b"changed %d of %d " % (i, n) + b"y" * 1000
            write_file(path, body)
            changed.append((os.path.join(b.member, f"d{d}", f"f{f}"), body))
        time.sleep(0.5)  # let the owner hash them: a reconnect finds them settled
        t = now()
        b.mount("bob")
        path, body = changed[-1]
        ok = True
        try:
            wait_until(lambda: read_or_none(path) == body, timeout, 0.002, f"bob to catch up {n}")
            secs = now() - t
        except Exception as e:
            log(f"brume: reconnect after {n}: {e}")
            secs, ok = None, False
        if ok:
            wait_until(lambda: all(read_or_none(p) == w for p, w in changed), timeout, 0.05, "every change at bob")
        time.sleep(1.5)
        received = received_from_alice(b)
        after = subscriptions(alice_log)
        # Every subscription not answered from the log was answered by a snapshot.
        snapshots = (after[0] - before[0]) - (after[1] - before[1])
        log(f"brume: reconnect after {n} changes: {secs_or(secs)}, {received} bytes received")
        runs.append(dict(changes=n, secs=secs, received=received, snapshots=snapshots))
    return dict(files=dirs * per, join_bytes=join_bytes, runs=runs)


def subscriptions(owner_log):
    """(subscriptions, those answered from the change log) in the owner's log."""
    with open(owner_log, "rb") as f:
        text = f.read()
    return text.count(b"member subscribed"), text.count(b"member caught up from the log")


def received_from_alice(b):
    live = b.status("bob").get("live") or {}
    return int(((live.get("peers") or {}).get("alice") or {}).get("bytes_received", 0))


def main():
    global ROOT, KEEP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brume", default="target/release/brume", help="the brume binary")
    ap.add_argument("--syncthing", default=shutil.which("syncthing") or "syncthing")
    ap.add_argument("--reps", type=int, default=5, help="new-file repetitions (default 5)")
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000, help="files in the many-files test (100 dirs)")
    ap.add_argument("--default-delay-reps", type=int, default=3,
                    help="new-file repetitions for Syncthing at its default fsWatcherDelayS=10 (0: skip)")
    ap.add_argument("--only", default="new,many,bulk,edit",
                    help="workloads to run, in this order (edit changes the file bulk made)")
    ap.add_argument("--timeout", type=int, default=600,
                    help="give up on one system's many-files, bulk or edit wait after this many seconds")
    ap.add_argument("--reconnect-files", type=int, default=20000,
                    help="files in the reconnect test's group (200 dirs)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    KEEP = args.keep

    if os.geteuid() != 0:
        sys.exit("run as root (FUSE mounts, passthrough, clear_refs)")
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ROOT = tempfile.mkdtemp(prefix="brume-syncbench-", dir="/tmp")
    log(f"data in {ROOT}")
    ver = subprocess.run([args.syncthing, "--version"], capture_output=True, text=True).stdout.split()[:2]
    bver = subprocess.run([args.brume, "--version"], capture_output=True, text=True).stdout.strip()
    load0 = os.getloadavg()

    todo = args.only.split(",")
    brume = Brume(args.brume, ROOT)
    brume.setup()
    with_st = any(w != "reconnect" for w in todo)
    st = Syncthing(args.syncthing, ROOT, delay=1) if with_st else None
    systems = [brume]
    if st:
        st.setup()
        systems.append(st)
        bad = non_loopback_sockets(st.all_pids())
        log("syncthing sockets: " + ("all on loopback" if not bad else "NOT LOOPBACK: " + "; ".join(bad)))
        if bad:
            raise SystemExit("syncthing has a socket off loopback; stopping")
    bad_b = non_loopback_sockets(brume.all_pids())
    log("brume sockets: " + ("all on loopback" if not bad_b else "bound/talking beyond 127.0.0.1: " + "; ".join(bad_b)))

    R = {}
    size = args.bulk_mib * MIB
    for w in todo:
        log(f"--- {w} (load average {os.getloadavg()[0]:.2f})")
        if w == "new":
            R["new"] = bench_new_file(systems, args.reps)
            for s in systems:
                log(f"{s.name}: new-file latencies " + ", ".join(fmt_ms(x) for x in R["new"][s.name]))
        elif w == "bulk":
            for s in systems:
                s.begin("bulk")
            src = os.path.join(ROOT, "src.bin")
            h = hashlib.sha256()
            with open(src, "wb") as f:
                for _ in range(args.bulk_mib):
                    b = os.urandom(MIB)
                    h.update(b)
                    f.write(b)
            R["bulk"] = bench_bulk(systems, src, h.hexdigest(), size, args.timeout)
            os.unlink(src)
        elif w == "edit":
            R["edit"] = bench_edit(systems, size // 2, args.timeout)
        elif w == "reconnect":
            R["reconnect"] = bench_reconnect(brume, args.reconnect_files, args.timeout)
        elif w == "many":
            for s in systems:
                s.begin("many")
            R["many"] = bench_many(systems, 100, max(1, args.files // 100), 4 * KIB, args.timeout)
        else:
            sys.exit(f"unknown workload {w}")
    if "new" in todo and args.default_delay_reps > 0:
        st.set_delay(10)
        log(f"syncthing new-file with fsWatcherDelayS=10: {args.default_delay_reps} reps")
        R["new10"] = bench_new_file([st], args.default_delay_reps, tag="d10")[st.name]
        log("syncthing (delay 10): " + ", ".join(fmt_ms(x) for x in R["new10"]))
    if st:
        bad = non_loopback_sockets(st.all_pids())
        log("syncthing sockets at the end: " + ("all on loopback" if not bad else "NOT LOOPBACK: " + "; ".join(bad)))

    # ---------------- the table ----------------
    load1 = os.getloadavg()
    print()
    print(f"Group sync, owner -> member, one run: {bver}" + (f" vs syncthing {' '.join(ver[1:2])}" if st else ""))
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().release}; load average "
          f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end; order: {args.only}")
    print()
    print("| workload | Brume | Syncthing (fsWatcherDelayS=1) | Brume/Syncthing |")
    print("|---|---|---|---|")
    floors = []
    if "new" in R:
        b, s = R["new"]["brume"], R["new"]["syncthing"]
        for p in (50, 90):
            bb, ss = pct(b, p), pct(s, p)
            print(f"| new 4 KiB file, p{p} (n={len(b)}) | {fmt_ms(bb)} | {fmt_ms(ss)} | {bb / ss:.3f}x time |")
        floors.append(("new file p50 <= 100 ms", pct(b, 50) <= 0.1, fmt_ms(pct(b, 50))))
    if "new10" in R:
        s10 = R["new10"]
        print(f"| new 4 KiB file, p50, Syncthing default fsWatcherDelayS=10 (n={len(s10)}) | "
              f"{fmt_ms(pct(R['new']['brume'], 50))} | {fmt_ms(pct(s10, 50))} | "
              f"{pct(R['new']['brume'], 50) / pct(s10, 50):.3f}x time |")
    if "many" in R:
        b, s = R["many"]["brume"], R["many"]["syncthing"]
        n = b["n"]

        def listed(r):
            return secs(r["listed"]) if r["listed"] is not None else f"> {r['timeout']} s: {r['present']} of {n} after {r['timeout']} s"

        print(f"| {n} x 4 KiB files in 100 dirs: all listed with size at member | {listed(b)} | {listed(s)} | "
              f"{ratio(b['listed'], s['listed'])} |")
        print(f"| ↳ all content at member | {secs(b['complete'])} | {secs(s['complete'])} | "
              f"{ratio(b['complete'], s['complete'])} |")
        print(f"| ↳ writing them at the owner | {b['write_s']:.2f} s | {s['write_s']:.2f} s | |")
        print(f"| ↳ member daemon peak RSS | {b['rss_member'] / MIB:.1f} MiB | {s['rss_member'] / MIB:.1f} MiB | "
              f"{b['rss_member'] / s['rss_member']:.2f}x |")
        print(f"| ↳ owner daemon peak RSS | {b['rss_owner'] / MIB:.1f} MiB | {s['rss_owner'] / MIB:.1f} MiB | "
              f"{b['rss_owner'] / s['rss_owner']:.2f}x |")
        floors.append((f"{n} files <= 5 s", b["complete"] is not None and b["complete"] <= 5,
                       f"listed {listed(b)}, content {secs(b['complete'])}"))
        floors.append(("member RSS <= 60 MiB", b["rss_member"] <= 60 * MIB, f"{b['rss_member'] / MIB:.1f} MiB"))
    if "bulk" in R:
        b, s = R["bulk"]["brume"], R["bulk"]["syncthing"]

        def bulk(r):
            if r["secs"] is not None:
                return f"{r['secs']:.2f} s = {r['mbps']:.0f} MB/s"
            p = r["partial"]
            if p:
                return (f"not done after {p['after_s']:.0f} s: {p['blocks']} of {p['blocks_total'] if 'blocks_total' in p else p['of']}"
                        f" blocks = {p['mbps']:.2f} MB/s")
            return "not done (timeout)"

        rate = lambda r: r["mbps"] if r["mbps"] is not None else (r["partial"] or {}).get("mbps")
        rb, rs = rate(b), rate(s)
        print(f"| {args.bulk_mib} MiB file, end of write -> all at member | {bulk(b)} | {bulk(s)} | "
              f"{f'{rb / rs:.3f}x throughput' if rb and rs else '-'} |")
        print(f"| ↳ size visible at member | {secs(b['size_s'])} | {secs(s['size_s'])} | |")
        ck = lambda r: "not checked" if r["ok"] is None else ("ok" if r["ok"] else "MISMATCH")
        print(f"| ↳ content check (sha256 at member) | {ck(b)} | {ck(s)} | |")
        floors.append(("bulk >= 100 MB/s", bool(b["ok"]) and b["mbps"] >= 100, bulk(b)))
    if "edit" in R:
        b, s = R["edit"]["brume"], R["edit"]["syncthing"]
        print(f"| 1-byte edit at {size // 2 // MIB} MiB: until seen at member | {secs_or(b['secs'])} | {secs_or(s['secs'])} | "
              f"{ratio(b['secs'], s['secs'])} |")
        print(f"| ↳ bytes exchanged, per the daemons' peer counters | {b['wire'] / KIB:.1f} KiB | "
              f"{s['wire'] / KIB:.1f} KiB | {b['wire'] / max(1, s['wire']):.2f}x |")
        print(f"| ↳ bytes on lo in the window (everything on loopback) | {b['lo'] / KIB:.1f} KiB | "
              f"{s['lo'] / KIB:.1f} KiB | {b['lo'] / max(1, s['lo']):.2f}x |")
        floors.append(("1-byte edit <= 500 ms", b["secs"] is not None and b["secs"] <= 0.5, secs_or(b["secs"])))
        floors.append(("1-byte edit <= 1 MiB on the wire", b["secs"] is not None and b["wire"] <= MIB and b["lo"] <= MIB,
                       f"{b['wire'] / KIB:.0f} KiB counted, {b['lo'] / KIB:.0f} KiB on lo"))
    if "reconnect" in R:
        r = R["reconnect"]
        print(f"| reconnect, group of {r['files']} files: first full sync, bytes received | "
              f"{r['join_bytes'] / KIB:.1f} KiB | | |")
        for c in r["runs"]:
            print(f"| ↳ after {c['changes']} changed: member start -> caught up | {secs_or(c['secs'])} | | |")
            print(f"| ↳ after {c['changes']} changed: bytes received | {c['received'] / KIB:.1f} KiB "
                  f"({c['received'] / c['changes']:.0f} B per change; snapshots sent: {c['snapshots']}) | | |")
        one, many = r["runs"][0], r["runs"][-1]
        floors.append(("reconnect after 1 change <= 64 KiB received",
                       one["received"] <= 64 * KIB, f"{one['received'] / KIB:.1f} KiB"))
        floors.append(("reconnect after 1 change <= 500 ms to caught up",
                       one["secs"] is not None and one["secs"] <= 0.5, secs_or(one["secs"])))
        floors.append(("reconnect after 1,000 changes: no snapshot, bytes proportional",
                       many["snapshots"] == 0 and many["received"] <= 2 * many["changes"] * max(1, one["received"]),
                       f"{many['received'] / KIB:.1f} KiB = {many['received'] / one['received']:.0f}x the 1-change figure"))
    print()
    print("Brume floors:")
    for what, ok, val in floors:
        print(f"  {'met    ' if ok else 'NOT MET'}  {what}: {val}")
    print()
    print("raw:", json.dumps(R, default=str))


if __name__ == "__main__":
    main()
