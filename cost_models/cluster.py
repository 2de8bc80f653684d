"""The cluster spec: which devices there are, on which nodes, and how they are linked.

The spec is JSON::

    {
      "nodes": [{"device": "A100-80GB", "count": 4},
                {"device": "V100-32GB", "count": 4, "intra_node_GBps": 150}],
      "inter_node_GBps": 12.5,
      "latency_us": {"intra_node": 5, "inter_node": 20},
      "devices": {"MyAccel": {"fp32_tflops": 20, "bf16_tflops": 160, "mem_GB": 48, "mem_GBps": 900},
                  "CPU": {"profile": "cpu_profile.json"}}
    }

A node holds ``count`` devices of one type. Devices are numbered node by node
(node 0's devices first); that index is the device's identity everywhere in
the plan. ``devices`` adds new device types or overrides fields of catalog
entries (see :mod:`cost_models.devices`).

Defaults: ``inter_node_GBps`` 12.5 (one 100 Gb/s NIC per device), a node's
``intra_node_GBps`` from its device type, latencies 5 us inside a node and
20 us between nodes (typical NCCL small-message latencies). For a new device
type, ``bf16_tflops``/``fp16_tflops`` default to each other and then to
``fp32_tflops``, and ``intra_node_GBps`` to 64 (PCIe Gen5 x16 per direction).

A device type's ``profile`` names a file written by ``hetcompile profile``
(relative to the spec's folder), or holds its JSON inline. Its measured numbers
replace the datasheet ones: matmul FLOP/s per dtype, memory bandwidth, and,
when it measured links, ``intra_node_GBps`` and the intra-node latency of the
nodes of that type; numbers written beside it in the same entry (or on the
node, or in ``latency_us``) still win. The cost model then also charges the
profile's per-op and per-optimizer-tensor times (see :mod:`cost_models.profile`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from cost_models.devices import CATALOG, DeviceType, lookup_device_type, suggest
from cost_models.profile import DeviceProfile, load_profile
from hetcompile.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_INTER_NODE_GBPS = 12.5  # 100 Gb/s Ethernet/InfiniBand per device
DEFAULT_INTRA_NODE_LATENCY_US = 5.0
DEFAULT_INTER_NODE_LATENCY_US = 20.0
DEFAULT_NEW_DEVICE_INTRA_NODE_GBPS = 64.0
# Far above any real job (the largest runs use some 10^5 accelerators), low enough that a typo such
# as "count": 80000000 is caught here instead of exhausting memory in the planner, which lists devices.
MAX_DEVICES = 1 << 17

_TOP_KEYS = ("nodes", "inter_node_GBps", "latency_us", "devices")
_NODE_KEYS = ("device", "count", "intra_node_GBps", "intra_node_latency_us")
_LATENCY_KEYS = ("intra_node", "inter_node")
_DEVICE_NUMBER_KEYS = ("fp32_tflops", "bf16_tflops", "fp16_tflops", "mem_GB", "mem_GBps", "intra_node_GBps")
_DEVICE_KEYS = _DEVICE_NUMBER_KEYS + ("source", "profile")
_NEW_DEVICE_REQUIRED = ("fp32_tflops", "mem_GB", "mem_GBps")


@dataclass(frozen=True)
class Device:
    index: int  # position in Cluster.devices, the device's id in the plan
    type: str  # DeviceType.name
    node: int  # index into Cluster.nodes


@dataclass(frozen=True)
class Node:
    device: str  # DeviceType.name (canonical spelling)
    count: int
    intra_node_GBps: float
    # From the device type's profile when the spec sets no intra-node latency; else None
    # (the cluster's intra_node_latency_s).
    intra_node_latency_s: float | None = None


@dataclass(frozen=True)
class Cluster:
    """A parsed cluster spec.

    >>> c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "v100-32gb", "count": 2}]})
    >>> [d.type for d in c.devices]
    ['A100-80GB', 'A100-80GB', 'V100-32GB', 'V100-32GB']
    >>> c.link_bw_bytes_per_s(0, 1), c.link_bw_bytes_per_s(1, 2)
    (300000000000.0, 12500000000.0)
    >>> Cluster.from_json(c.to_json()) == c
    True
    """

    nodes: tuple[Node, ...]
    device_types: tuple[DeviceType, ...]  # the types used by some node, sorted by name
    inter_node_GBps: float
    inter_node_latency_s: float
    intra_node_latency_s: float

    @functools.cached_property  # 1,024-device plans ask for it per link: build it once
    def devices(self) -> tuple[Device, ...]:
        out = []
        for n, node in enumerate(self.nodes):
            for _ in range(node.count):
                out.append(Device(len(out), node.device, n))
        return tuple(out)

    @property
    def num_devices(self) -> int:
        return sum(node.count for node in self.nodes)

    def type_of(self, name: str) -> DeviceType:
        """The DeviceType called ``name`` (case-insensitive) among the types this cluster uses."""
        return lookup_device_type(name, {t.name: t for t in self.device_types})

    def count_of(self, name: str) -> int:
        """How many devices of type ``name`` the cluster has."""
        canonical = self.type_of(name).name
        return sum(node.count for node in self.nodes if node.device == canonical)

    @property
    def inter_node_bw_bytes_per_s(self) -> float:
        return self.inter_node_GBps * 1e9

    def link_bw_bytes_per_s(self, dev_a: int, dev_b: int) -> float:
        """Per-direction bandwidth between two devices: the node's intra-node link, or the network."""
        devices = self.devices
        node_a, node_b = devices[dev_a].node, devices[dev_b].node
        if node_a == node_b:
            return self.nodes[node_a].intra_node_GBps * 1e9
        return self.inter_node_bw_bytes_per_s

    def link_latency_s(self, dev_a: int, dev_b: int) -> float:
        devices = self.devices
        node = devices[dev_a].node
        if node == devices[dev_b].node:
            measured = self.nodes[node].intra_node_latency_s
            return self.intra_node_latency_s if measured is None else measured
        return self.inter_node_latency_s

    def to_json(self) -> dict:
        """Canonical JSON: every default written out and every used type described in full,
        so the plan does not depend on the catalog of the compiler version that reads it."""
        return {
            "nodes": [{"device": n.device, "count": n.count, "intra_node_GBps": n.intra_node_GBps,
                       **({} if n.intra_node_latency_s is None else
                          {"intra_node_latency_us": round(n.intra_node_latency_s * 1e6, 9)})} for n in self.nodes],
            "inter_node_GBps": self.inter_node_GBps,
            # Rounded so that seconds -> microseconds -> seconds is exact.
            "latency_us": {
                "intra_node": round(self.intra_node_latency_s * 1e6, 9),
                "inter_node": round(self.inter_node_latency_s * 1e6, 9),
            },
            "devices": {t.name: _device_json(t) for t in self.device_types},
        }

    @classmethod
    def from_json(cls, d: dict) -> "Cluster":
        return load_cluster(d)


def _device_json(t: DeviceType) -> dict:
    out = {k: getattr(t, k) for k in _DEVICE_KEYS if k != "profile"}
    if t.profile is not None:
        # Inline: the plan stays self-contained (the matmul samples are a few dozen numbers).
        out["profile"] = t.profile.to_json()
    return out


def load_cluster(source: str | os.PathLike | dict) -> Cluster:
    """Parse a cluster spec from a JSON file path or an already parsed dict.

    Raises :class:`UserError` with the location of the problem (``nodes[1].count``)
    and the fix.

    >>> load_cluster({"nodes": [{"device": "H100-80GB", "count": 8}]}).num_devices
    8
    """
    base_dir = "."
    if isinstance(source, dict):
        spec, where = source, "the cluster spec"
    elif isinstance(source, (str, os.PathLike)):
        spec, where = _read_json(source), f"cluster spec {os.fspath(source)!r}"
        base_dir = os.path.dirname(os.fspath(source)) or "."
    else:
        raise UserError(
            f"A cluster spec must be a path to a JSON file or a dict, got {type(source).__name__}. "
            "Pass e.g. --cluster cluster.json."
        )
    return _parse(spec, where, base_dir)


def _read_json(path) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(
            f"Cluster spec file {path!r} does not exist. Check the path, or write one such as "
            '{"nodes": [{"device": "A100-80GB", "count": 4}]}.'
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(
            f"Cluster spec {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the syntax there (a missing comma or quote, or a trailing comma, is the usual cause)."
        ) from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"Cluster spec {path!r} is not UTF-8 text (byte {e.start} cannot be decoded). Save it as UTF-8 JSON."
        ) from None
    except OSError as e:  # a directory, no permission, ...
        raise UserError(
            f"Cluster spec {path!r} cannot be read: {e.strerror or e}. Pass the path of a JSON file."
        ) from None


def _check_keys(d: dict, allowed: tuple[str, ...], loc: str, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise UserError(
                f"Unknown key {key!r} at {loc} in {where}.{suggest(str(key), allowed)} "
                f"Allowed keys there: {', '.join(allowed)}. Remove or rename it."
            )


def _positive_number(value: Any, loc: str, where: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 or (allow_zero and value == 0)):
        return float(value)
    need = "a non-negative number" if allow_zero else "a positive number"
    raise UserError(f"{loc} in {where} is {value!r}, but it must be {need}. Set it to e.g. 12.5.")


def _profile_numbers(profile: DeviceProfile) -> dict[str, float]:
    """The datasheet fields a profile measures, in the spec's units."""
    rates = dict(profile.matmul_flops_per_s)
    numbers = {"fp32_tflops": profile.flops_per_s("fp32") / 1e12, "mem_GBps": profile.mem_bw_bytes_per_s / 1e9}
    for dtype in ("bf16", "fp16"):
        if dtype in rates:
            numbers[f"{dtype}_tflops"] = rates[dtype] / 1e12
    if profile.comm is not None:
        numbers["intra_node_GBps"] = profile.comm.p2p_bw_bytes_per_s / 1e9
    return numbers


def _read_profile(value: Any, loc: str, where: str, base_dir: str) -> DeviceProfile:
    if isinstance(value, dict):
        return DeviceProfile.from_json(value, where=f"{loc} in {where}")
    if isinstance(value, str):
        try:
            return load_profile(os.path.join(base_dir, value))
        except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not UTF-8
            raise UserError(f"{loc} in {where}: profile file {value!r} cannot be read ({type(e).__name__}: {e}). "
                            "Pass the path of a file written by `hetcompile profile -o FILE`.") from None
    raise UserError(f"{loc} in {where} must be the path of a file written by `hetcompile profile -o FILE` "
                    f"(relative to the spec's folder) or that file's JSON object, got {type(value).__name__}.")


def _parse_device_types(spec_devices: Any, where: str, base_dir: str = ".") -> dict[str, DeviceType]:
    """Catalog plus the spec's ``devices`` section (new types and overrides)."""
    catalog = dict(CATALOG)
    if spec_devices is None:
        return catalog
    if not isinstance(spec_devices, dict):
        raise UserError(
            f'"devices" in {where} must be an object mapping a device name to its fields, '
            f'e.g. {{"MyAccel": {{"fp32_tflops": 20, "mem_GB": 48, "mem_GBps": 900}}}}.'
        )
    by_lower = {k.lower(): k for k in CATALOG}
    for name, fields in spec_devices.items():
        loc = f"devices.{name}"
        if not isinstance(fields, dict):
            raise UserError(f"{loc} in {where} must be an object of device fields ({', '.join(_DEVICE_KEYS)}).")
        _check_keys(fields, _DEVICE_KEYS, loc, where)
        numbers = {}
        for key in _DEVICE_NUMBER_KEYS:
            if key in fields:
                # bf16/fp16 may be 0: it means "no such path", as in the catalog.
                numbers[key] = _positive_number(fields[key], f"{loc}.{key}", where,
                                                allow_zero=key in ("bf16_tflops", "fp16_tflops"))
        if "source" in fields and not isinstance(fields["source"], str):
            raise UserError(f"{loc}.source in {where} must be a string (where the numbers come from).")
        profile = None
        if "profile" in fields:
            profile = _read_profile(fields["profile"], f"{loc}.profile", where, base_dir)
            # Numbers written in the entry win over measured ones.
            numbers = {**_profile_numbers(profile), **numbers}
            if "source" not in fields:
                fields = {**fields, "source": f"measured: {profile.device_name}, {profile.num_threads} thread(s), "
                                              f"{profile.created or 'undated'} (hetcompile profile)"}
        if name.lower() in by_lower:
            base = catalog[by_lower[name.lower()]]
            replaced = dataclasses.replace(base, **numbers, profile=profile)
            if numbers and "source" not in fields:
                replaced = dataclasses.replace(replaced, source=base.source + " (overridden in the cluster spec)")
            elif "source" in fields:
                replaced = dataclasses.replace(replaced, source=fields["source"])
            catalog[base.name] = replaced
            continue
        missing = [k for k in _NEW_DEVICE_REQUIRED if k not in numbers]
        if missing:
            raise UserError(
                f"New device type {name!r} ({loc} in {where}) is missing {', '.join(missing)}. "
                f"A device not in the catalog needs at least {', '.join(_NEW_DEVICE_REQUIRED)}."
                f"{suggest(name, CATALOG)} Catalog types: {', '.join(sorted(CATALOG))}."
            )
        fp32 = numbers["fp32_tflops"]
        bf16 = numbers.get("bf16_tflops", numbers.get("fp16_tflops", fp32))
        fp16 = numbers.get("fp16_tflops", numbers.get("bf16_tflops", fp32))
        catalog[name] = DeviceType(
            name=name,
            fp32_tflops=fp32,
            bf16_tflops=bf16,
            fp16_tflops=fp16,
            mem_GB=numbers["mem_GB"],
            mem_GBps=numbers["mem_GBps"],
            intra_node_GBps=numbers.get("intra_node_GBps", DEFAULT_NEW_DEVICE_INTRA_NODE_GBPS),
            source=fields.get("source", "user cluster spec"),
            profile=profile,
        )
    return catalog


def _parse(spec: Any, where: str, base_dir: str = ".") -> Cluster:
    if not isinstance(spec, dict):
        raise UserError(
            f"{where} must be a JSON object with a \"nodes\" list, got {type(spec).__name__}. "
            'Write e.g. {"nodes": [{"device": "A100-80GB", "count": 4}]}.'
        )
    _check_keys(spec, _TOP_KEYS, "the top level", where)
    catalog = _parse_device_types(spec.get("devices"), where, base_dir)

    nodes_spec = spec.get("nodes")
    if not isinstance(nodes_spec, list) or not nodes_spec:
        problem = "has no \"nodes\" list" if nodes_spec is None else "has an empty or non-list \"nodes\""
        raise UserError(
            f"{where} {problem}. List the machines, one entry per node, e.g. "
            '"nodes": [{"device": "A100-80GB", "count": 4}].'
        )
    intra_latency_set = isinstance(spec.get("latency_us"), dict) and "intra_node" in spec["latency_us"]
    nodes = []
    for n, entry in enumerate(nodes_spec):
        loc = f"nodes[{n}]"
        if not isinstance(entry, dict):
            raise UserError(f'{loc} in {where} must be an object like {{"device": "A100-80GB", "count": 4}}.')
        _check_keys(entry, _NODE_KEYS, loc, where)
        if "device" not in entry:
            raise UserError(f'{loc} in {where} has no "device". Add the device type, e.g. "device": "A100-80GB".')
        try:
            dtype = lookup_device_type(entry["device"], catalog)
        except UserError as e:
            raise UserError(f"{loc}.device in {where}: {e}") from None
        count = entry.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise UserError(
                f"{loc}.count in {where} is {count!r}, but it must be a positive integer: "
                f"the number of {dtype.name} devices in that node. Set e.g. \"count\": 4."
            )
        intra = dtype.intra_node_GBps
        if "intra_node_GBps" in entry:
            intra = _positive_number(entry["intra_node_GBps"], f"{loc}.intra_node_GBps", where)
        latency_s = None
        if "intra_node_latency_us" in entry:
            latency_s = _positive_number(entry["intra_node_latency_us"], f"{loc}.intra_node_latency_us", where,
                                         allow_zero=True) / 1e6
        elif dtype.profile is not None and dtype.profile.comm is not None and not intra_latency_set:
            latency_s = dtype.profile.comm.p2p_latency_s
        nodes.append(Node(device=dtype.name, count=count, intra_node_GBps=float(intra),
                          intra_node_latency_s=latency_s))

    inter = DEFAULT_INTER_NODE_GBPS
    if "inter_node_GBps" in spec:
        inter = _positive_number(spec["inter_node_GBps"], "inter_node_GBps", where)

    latency = {"intra_node": DEFAULT_INTRA_NODE_LATENCY_US, "inter_node": DEFAULT_INTER_NODE_LATENCY_US}
    if "latency_us" in spec:
        lat_spec = spec["latency_us"]
        if not isinstance(lat_spec, dict):
            raise UserError(
                f'latency_us in {where} must be an object like {{"intra_node": 5, "inter_node": 20}} (microseconds).'
            )
        _check_keys(lat_spec, _LATENCY_KEYS, "latency_us", where)
        for key, value in lat_spec.items():
            latency[key] = _positive_number(value, f"latency_us.{key}", where, allow_zero=True)

    total = sum(node.count for node in nodes)
    if total > MAX_DEVICES:
        raise UserError(
            f"{where} describes {total} devices, more than the {MAX_DEVICES} hetcompile plans for. Check the "
            "\"count\" of each node: it is the number of devices in that one node."
        )
    used = sorted({node.device for node in nodes})
    cluster = Cluster(
        nodes=tuple(nodes),
        device_types=tuple(catalog[name] for name in used),
        inter_node_GBps=float(inter),
        inter_node_latency_s=latency["inter_node"] / 1e6,
        intra_node_latency_s=latency["intra_node"] / 1e6,
    )
    logger.debug("cluster: %d devices on %d nodes, types %s", cluster.num_devices, len(nodes), used)
    return cluster
