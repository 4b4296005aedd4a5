"""The hosts' network for flows/cluster.py: one network namespace per worker host on a private
bridge, so that a host reaches the two servers and nothing else on this machine (root and
iproute2's `ip netns` needed; `netns_available` says whether they are there)."""

from __future__ import annotations

import os
import shutil
import subprocess

from flows.services import run_checked

NETWORK_PREFIX = "10.231"  # a private range; each cluster takes the first free 10.231.X.0/24


def netns_available() -> bool:
    """Network namespaces need root and iproute2's `ip netns`."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def make_network(names: list[str]) -> dict:
    """A bridge with the servers' address 10.231.X.1 and, per host, a network namespace with
    its own loopback and one veth interface on the bridge (10.231.X.(10 + k)). Nothing is
    routed or forwarded off the bridge: a host reaches the two servers and nothing else."""
    taken = run_checked(["ip", "-o", "addr"])
    subnet = next(
        (x for x in range(1, 251) if f" {NETWORK_PREFIX}.{x}.1/" not in taken),
        None,
    )
    if subnet is None or len(names) > 240:
        raise RuntimeError(f"no free {NETWORK_PREFIX}.X.0/24 subnet, or too many hosts")
    address = f"{NETWORK_PREFIX}.{subnet}.1"
    network = {"bridge": f"ubo-br-{subnet}", "address": address, "namespaces": {}}
    run_checked(["ip", "link", "add", network["bridge"], "type", "bridge"])
    run_checked(["ip", "addr", "add", f"{address}/24", "dev", network["bridge"]])
    run_checked(["ip", "link", "set", network["bridge"], "up"])
    for index, name in enumerate(names, 1):
        namespace, veth = f"ubo-{subnet}-{name}", f"ubo-{subnet}-h{index}"
        network["namespaces"][name] = namespace
        run_checked(["ip", "netns", "add", namespace])
        peer = ["peer", "name", "eth0", "netns", namespace]
        run_checked(["ip", "link", "add", veth, "type", "veth", *peer])
        run_checked(["ip", "link", "set", veth, "master", network["bridge"], "up"])
        inside = ["ip", "-n", namespace]
        host_address = f"{NETWORK_PREFIX}.{subnet}.{10 + index}/24"
        run_checked([*inside, "addr", "add", host_address, "dev", "eth0"])
        run_checked([*inside, "link", "set", "eth0", "up"])
        run_checked([*inside, "link", "set", "lo", "up"])
    return network


def remove_network(network: dict) -> None:
    """Delete the namespaces (their veth pairs go with them) and the bridge."""
    for namespace in network["namespaces"].values():
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", network["bridge"]], capture_output=True)
