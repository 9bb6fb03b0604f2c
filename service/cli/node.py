"""`unroll node list` and `unroll node drain NODE`: the Ray nodes of the cluster, and taking
one out for maintenance without losing work or spending attempts (docs/deployment.md).

A drain does two things. It marks the node in Redis (Keys.node_drain): every training
attempt running there reads the mark at its next update, writes a checkpoint and hands its
slot back (workers.preemption: the job goes back to the queue, not counted against
max_attempts, and resumes elsewhere with the losses of a run never stopped). And it asks
Ray's GCS to drain the node (reason "preemption"): Ray places nothing new there, and the
node leaves the cluster once idle. Evaluation jobs and data-parallel groups do not watch for
the mark; they run to their end there (or, if the node is stopped first, resume from their
checkpoint on another node like any lost attempt).

NODE is a node id (the hex of `unroll node list`, or a unique prefix of at least 6 digits)
or a node name (Ray's NodeName, its address unless `ray start --node-name` set one) that
only one alive node has. Both commands talk to Ray at UNROLL_RAY_ADDRESS (or --ray-address)
and to the Redis of UNROLL_REDIS_URL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from service.cli.common import UsageError, table

MIN_PREFIX = 6
DRAIN_TTL_S = 7 * 86400  # a drained node leaves Ray; its mark outlives it a while, then goes
REASON_MAX = 200
WAIT_MAX_S = 86400


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("node", help="the cluster's Ray nodes: list them, drain one for maintenance")
    sub = p.add_subparsers(dest="node_command", required=True)
    listing = sub.add_parser("list", help="the alive nodes: id, name, CPUs, GPUs, and whether draining")
    listing.add_argument("--json", action="store_true", help="a JSON list with every node's resources")
    _ray_args(listing)
    listing.set_defaults(func=_list)
    drain = sub.add_parser(
        "drain", help="take a node out: its jobs checkpoint and move to other nodes without using attempts",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drain.add_argument("node", help="a node id (or a unique prefix of 6+ hex digits) or a unique node name")
    drain.add_argument("--reason", default="maintenance", type=_reason, help="said in the moved jobs' logs (default: maintenance)")
    drain.add_argument("--wait", action="store_true", help="return once the node has left the cluster")
    drain.add_argument("--timeout", type=_seconds, default=600.0, help="with --wait: give up after this many seconds (exit 1)")
    _ray_args(drain)
    drain.set_defaults(func=_drain)


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, help="the Ray head, host:port (default: UNROLL_RAY_ADDRESS)")


def _reason(text: str) -> str:
    if not text.strip() or len(text) > REASON_MAX or not text.isprintable():
        raise argparse.ArgumentTypeError(f"a reason is 1 to {REASON_MAX} printable characters")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= WAIT_MAX_S:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, more than 0 and at most {WAIT_MAX_S}")
    return value


def _connect(args: argparse.Namespace) -> Any:
    """The ray module, connected to the cluster as a driver."""
    from service.store.settings import get_settings

    address = args.ray_address or get_settings().ray_address
    if not address:
        raise UsageError("no Ray cluster: set UNROLL_RAY_ADDRESS (or --ray-address) to the head's host:port")
    from workers.ray_auth import use_ray_token

    use_ray_token()
    import ray

    try:
        ray.init(address=address, namespace="unroll", log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError) as exc:
        raise UsageError(f"cannot reach Ray at {address}: {exc}") from None
    return ray


def _redis():
    import redis

    from service.store.keys import Keys
    from service.store.settings import get_settings

    settings = get_settings()
    return redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5), Keys(settings.redis_prefix)


def alive_nodes(ray) -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def find_node(nodes: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The one alive node that `wanted` names (see the module's docstring); UsageError else."""
    by_id = [n for n in nodes if n["NodeID"] == wanted]
    if not by_id and len(wanted) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in wanted):
        by_id = [n for n in nodes if n["NodeID"].startswith(wanted)]
    found = by_id or [n for n in nodes if n.get("NodeName") == wanted]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"no alive node is {wanted!r} (see `unroll node list`)")
    ids = ", ".join(n["NodeID"][:12] for n in found)
    raise UsageError(f"{wanted!r} names {len(found)} nodes ({ids}): give the node id")


def _list(args: argparse.Namespace) -> int:
    ray = _connect(args)
    nodes = alive_nodes(ray)
    client, keys = _redis()
    try:
        marks = client.mget([keys.node_drain(n["NodeID"]) for n in nodes]) if nodes else []
    except Exception as exc:  # noqa: BLE001 - the list is still worth showing
        print(f"note: Redis did not answer ({exc}); drains are not shown", file=sys.stderr)
        marks = [None] * len(nodes)
    found = [
        {"id": node["NodeID"], "name": node.get("NodeName", ""), "head": "node:__internal_head__" in node["Resources"],
         "resources": node["Resources"], "draining": json.loads(mark)["reason"] if mark else None}
        for node, mark in zip(nodes, marks)
    ]
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    rows = [
        [n["id"], n["name"], f"{n['resources'].get('CPU', 0):g}", f"{n['resources'].get('GPU', 0):g}", "head" if n["head"] else "",
         "alive" if n["draining"] is None else f"draining ({n['draining']})"]
        for n in found
    ]
    print(table(rows, ["ID", "NAME", "CPU", "GPU", "ROLE", "STATE"]) if rows else "no alive nodes")
    return 0


def _drain(args: argparse.Namespace) -> int:
    ray = _connect(args)
    node = find_node(alive_nodes(ray), args.node)
    node_id = node["NodeID"]
    client, keys = _redis()
    mark = json.dumps({"node": node_id[:12], "reason": args.reason, "at": time.time()})
    try:
        client.set(keys.node_drain(node_id), mark, ex=DRAIN_TTL_S)
    except Exception as exc:  # noqa: BLE001 - without the mark, jobs there would not move
        raise UsageError(f"Redis did not answer ({exc}); nothing drained") from None
    accepted, why = _ask_ray_to_drain(ray, node_id, args.reason)
    if not accepted:
        client.delete(keys.node_drain(node_id))
        print(f"error: Ray refused to drain node {node_id[:12]}: {why}", file=sys.stderr)
        return 1
    print(f"node {node_id[:12]} ({node.get('NodeName', '')}) draining: its jobs checkpoint and move; "
          "it leaves the cluster once idle", flush=True)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while any(n["NodeID"] == node_id for n in alive_nodes(ray)):
        if time.monotonic() > deadline:
            print(f"error: node {node_id[:12]} still runs work after {args.timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(1.0)
    print(f"node {node_id[:12]} drained: it has left the cluster")
    return 0


def _ask_ray_to_drain(ray, node_id: str, reason: str) -> tuple[bool, str]:
    """Ray's GCS DrainNode (what its autoscaler calls, and the hidden `ray drain-node`):
    nothing new is placed on the node, which exits once idle. No deadline: our attempts
    leave at their next update, and what does not watch (an evaluation) finishes first."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    reason_code = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, message = gcs.drain_node(node_id, reason_code, reason, 0)
    return bool(accepted), message or ""
