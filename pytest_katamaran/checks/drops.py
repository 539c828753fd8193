"""Where a node dropped a packet: every drop counter a network namespace keeps, by name.

Why: a lost ping says nothing about where it died.  The zero-drop proof needs the place
(the tap's ring, a qdisc, a CPU's backlog, a neighbour that never answered, a socket's
receive buffer, a route lookup), so each migration reads these counters before and after
and reports what moved.  One shell command, no Python on the node (importing anything
costs seconds of a TCG node's CPU), parsed here.
"""

from __future__ import annotations

import shlex

# Sections, each after a `== name` line; every command is in iproute2 or /proc.
DROPS_CMD = "; ".join(
    [
        "echo '== links'; ip -s -o link show",
        "echo '== qdiscs'; tc -s qdisc show",
        "echo '== softnet'; cat /proc/net/softnet_stat",
        'for t in arp_cache ndisc_cache; do echo "== neigh $t"; cat /proc/net/stat/$t; done',
        'for t in raw icmp raw6 icmp6; do echo "== sockets $t"; cat /proc/net/$t 2>/dev/null; done',
        "echo '== nstat'; nstat -asz",
    ]
)
# The node's own namespace, then every named one (the pods'), each after `=== netns X`.
NODE_DROPS_CMD = (
    f"echo '=== netns -'; sh -c {shlex.quote(DROPS_CMD)}; "
    "for ns in $(ip netns list | cut -d' ' -f1); do echo \"=== netns $ns\"; "
    f'ip netns exec "$ns" sh -c {shlex.quote(DROPS_CMD)}; done'
)
NEIGH_COLUMNS = ("res_failed", "unresolved_discards")
NSTAT_WORDS = ("drop", "discard", "noroute", "fail", "error", "overflow", "prune")


def parse_drops(text: str) -> dict[str, int]:
    """DROPS_CMD's output as {counter: value}: `link <dev> rx_dropped|tx_dropped`,
    `qdisc <kind> <handle> dev <dev>`, `softnet cpu<N>`, `neigh arp_cache|ndisc_cache
    res_failed|unresolved_discards` (a neighbour that did not answer, what waited for it
    and was dropped), `sockets <table>` (the sum of the table's drops column), `nstat
    <name>` (its drop-like counters only)."""
    out: dict[str, int] = {}
    section, qdisc, names = "", "", list(NEIGH_COLUMNS)
    for ln in text.splitlines():
        if ln.startswith("== "):
            section, qdisc = ln[3:].strip(), ""
            continue
        fields = ln.split()
        if not fields:
            continue
        if section == "links" and ":" in ln:
            name = ln.split(":")[1].strip().split("@")[0]
            parts = ln.split("\\")
            for head, values in zip(parts, parts[1:], strict=False):
                if head.split()[:1] in (["RX:"], ["TX:"]):  # bytes packets errors dropped
                    where = head.split()[0][:2].lower()
                    out[f"link {name} {where}_dropped"] = int(values.split()[3])
        elif section == "qdiscs":
            if fields[0] == "qdisc":
                qdisc = " ".join(fields[1:5])
            elif "dropped" in ln and qdisc:
                out[f"qdisc {qdisc}"] = int(ln.split("dropped")[1].split(",")[0])
        elif section == "softnet":
            cpu = sum(1 for key in out if key.startswith("softnet "))
            out[f"softnet cpu{cpu}"] = int(fields[1], 16)  # column 2: backlog full
        elif section.startswith("neigh "):
            if fields[0] == "entries":
                names = fields
            else:  # one line per CPU, in hex: neighbours never resolved, packets dropped
                for name in NEIGH_COLUMNS:
                    key = f"{section} {name}"
                    out[key] = out.get(key, 0) + int(fields[names.index(name)], 16)
        elif section.startswith("sockets ") and fields[0] != "sl":
            out[section] = out.get(section, 0) + int(fields[-1])  # last column: drops
        elif section == "nstat" and len(fields) >= 2 and fields[1].isdigit():
            if any(word in fields[0].lower() for word in NSTAT_WORDS):
                out[f"nstat {fields[0]}"] = int(fields[1])
    return out


def parse_node_drops(text: str) -> dict[str, int]:
    """NODE_DROPS_CMD's output: the node's counters as they are, a pod netns's prefixed
    with `[<netns>] `."""
    out: dict[str, int] = {}
    for chunk in text.split("=== netns ")[1:]:
        ns, _, body = chunk.partition("\n")
        prefix = "" if ns.strip() == "-" else f"[{ns.strip()}] "
        out.update({prefix + k: v for k, v in parse_drops(body).items()})
    return out


def drops_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What moved between two readings (a counter new in `after` counts from 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def describe_drops(delta: dict[str, dict[str, int]]) -> str:
    """One line per node: `drops counted on node-b: link tap0_kata tx_dropped +12, ...`
    (`none` where nothing moved)."""
    lines = []
    for node, moved in delta.items():
        what = ", ".join(f"{k} {v:+d}" for k, v in sorted(moved.items())) or "none"
        lines.append(f"drops counted on {node}: {what}")
    return "\n".join(lines)
