#!/usr/bin/env python3
"""The ZooKeeper peer of `make bench`: its lock recipe, through kazoo's `Lock`.

Each client is its own ZooKeeper session (a KazooClient), as separate processes would be; they
run as threads here so that one monotonic clock times a handover (the holder's release to the
next holder's acquire returning).

  zookeeper.py --hosts 127.0.0.1:PORT handover   --waiters 2  --samples 150 --seconds 60
  zookeeper.py --hosts 127.0.0.1:PORT throughput --clients 32 --seconds 20

Prints one JSON object on stdout: {"samples_ms": [...]} or {"grants": N, "seconds": S}.
"""

import argparse
import json
import random
import sys
import threading
import time

from kazoo.client import KazooClient


def connect(hosts):
    zk = KazooClient(hosts=hosts, timeout=10.0)
    zk.start(timeout=15)
    return zk


def handover(hosts, path, waiters, samples, seconds):
    """Holder releases after a random 5-20 ms hold; the sample is release -> next acquire."""
    out = []
    state = {"released_at": None, "holder": None}
    mutex = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + seconds

    def client(i):
        zk = connect(hosts)
        lock = zk.Lock(path, "client-%d" % i)
        try:
            while not stop.is_set():
                if not lock.acquire(timeout=10):
                    continue
                now = time.monotonic()
                with mutex:
                    if state["released_at"] is not None and state["holder"] != i:
                        out.append((now - state["released_at"]) * 1000.0)
                    if len(out) >= samples or now > deadline:
                        stop.set()
                time.sleep(random.uniform(0.005, 0.02))
                with mutex:
                    state["released_at"] = time.monotonic()
                    state["holder"] = i
                lock.release()
        finally:
            zk.stop()
            zk.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(waiters + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return {"samples_ms": out[:samples]}


def throughput(hosts, path, clients, seconds):
    """Every client acquires and releases at once, as often as it can, for `seconds`."""
    grants = [0] * clients
    ready = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i):
        zk = connect(hosts)
        lock = zk.Lock(path, "client-%d" % i)
        try:
            ready.wait()
            while not stop.is_set():
                if lock.acquire(timeout=5):
                    if not stop.is_set():
                        grants[i] += 1
                    lock.release()
        finally:
            zk.stop()
            zk.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.monotonic()
    stop.wait(seconds)
    stop.set()
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(30)
    return {"grants": sum(grants), "seconds": elapsed}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", required=True)
    p.add_argument("--path", default="/kubelock-bench/lock")
    sub = p.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("handover")
    h.add_argument("--waiters", type=int, default=2)
    h.add_argument("--samples", type=int, default=150)
    h.add_argument("--seconds", type=float, default=60)
    t = sub.add_parser("throughput")
    t.add_argument("--clients", type=int, default=32)
    t.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()
    if args.mode == "handover":
        result = handover(args.hosts, args.path + "-handover", args.waiters, args.samples, args.seconds)
    else:
        result = throughput(args.hosts, args.path + "-throughput", args.clients, args.seconds)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
