"""Smoke: the minikube/k3s flows' logic, without a cluster, KVM, Kata or internet.

Why: tests/e2e/test_minikube.py and test_k3s.py skip on these machines, so everything
they rely on that can be checked here is: manifests (and that their YAML parses back),
kubectl JSON parsing on captured outputs, waits (timeouts and messages), QMP discovery
from a node listing (same answer as sandbox.discover_qmp_sockets), the Kata config patch,
the replayed destination QEMU command line, the katamaran bundle, the prerequisite
probes' messages, and the two testenv front-ends' usage errors and unreachable-node error.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from pytest_katamaran.kube import k3s, prereq
from pytest_katamaran.kube import model as kube
from pytest_katamaran.kube.model import KubeError, WaitTimeout
from pytest_katamaran.qemu.sandbox import SandboxSockets, discover_qmp_sockets

REPO = Path(__file__).resolve().parents[2]
SID = "3f1c0ffee0ddba11" + "0" * 48
RUN = f"/run/vc/vm/{SID}"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", _env())
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, **kw
    )


# --------------------------------------------------------------------------- manifests


def test_runtime_classes_map_to_the_kata_qemu_handler():
    rc = kube.runtime_class(kube.MINIKUBE_RUNTIME_CLASS)
    assert rc["apiVersion"] == "node.k8s.io/v1" and rc["kind"] == "RuntimeClass"
    assert rc["metadata"]["name"] == "kata-qemu" and rc["handler"] == "kata-qemu"
    assert "scheduling" not in rc
    k3s_rc = kube.runtime_class(kube.K3S_RUNTIME_CLASS, node_selector={"k": "v"})
    assert k3s_rc["metadata"]["name"] == "kata" and k3s_rc["handler"] == "kata-qemu"
    assert k3s_rc["scheduling"] == {"nodeSelector": {"k": "v"}}


def test_kata_pod_runs_nginx_alpine_with_the_runtime_class_and_pinning():
    pod = kube.kata_pod("kata-nginx", "kata", node_selector={kube.HOSTNAME_LABEL: "node-a"})
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    assert pod["metadata"]["name"] == "kata-nginx"
    spec = pod["spec"]
    assert spec["runtimeClassName"] == "kata"
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    assert "nodeName" not in spec
    (container,) = spec["containers"]
    assert container["image"] == "nginx:alpine"
    by_name = kube.kata_pod("p", "kata-qemu", node_name="minikube")["spec"]
    assert by_name["nodeName"] == "minikube" and "nodeSelector" not in by_name
    assert by_name["runtimeClassName"] == "kata-qemu"


def test_helper_pod_sees_the_node_namespaces_and_run_vc():
    pod = kube.helper_pod("h", "minikube", {"/run/vc": "/run/vc", "/tmp/k": "/tmp/k"})
    spec = pod["spec"]
    assert spec["nodeName"] == "minikube" and spec["hostPID"] and spec["hostNetwork"]
    assert "runtimeClassName" not in spec  # runc: it must not be a Kata VM itself
    (c,) = spec["containers"]
    assert c["securityContext"] == {"privileged": True}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert {path: vols[name] for path, name in mounts.items()} == {
        "/run/vc": "/run/vc",
        "/tmp/k": "/tmp/k",
    }


def _all_manifests() -> list[dict]:
    return [
        kube.runtime_class("kata-qemu", node_selector={kube.KATA_NODE_LABEL: "true"}),
        kube.kata_pod("kata-test", "kata-qemu", node_selector={kube.HOSTNAME_LABEL: "n1"}),
        kube.helper_pod("helper", "n1", {"/run/vc": "/run/vc"}),
    ]


def test_manifests_yaml_parses_back_to_the_same_structure():
    docs = _all_manifests()
    text = kube.to_yaml(*docs)
    assert text.count("---\n") == 3
    assert 'image: "nginx:alpine"' in text
    assert 'katacontainers.io/kata-runtime: "true"' in text  # a string, not a YAML bool
    assert kube.load_yaml_subset(text) == docs
    try:
        import yaml  # not a dependency: an extra, independent check where present
    except ImportError:
        return
    assert list(yaml.safe_load_all(text)) == docs


@pytest.mark.parametrize(
    "value", ["yes", "No", "on", "null", "~", "1", "1.5", "", "a: b", "-x", "#c", "x y", True, 0]
)
def test_yaml_scalars_round_trip(value):
    doc = {"k": value, "list": [value, {"inner": value}], "empty": {}, "none": []}
    assert kube.load_yaml_subset(kube.to_yaml(doc)) == [doc]


def test_kata_deploy_steps_are_pinned_and_bounded():
    steps = kube.kata_deploy_steps("3.7.0", timeout=600)
    urls = [a for s in steps for a in s.args if a.startswith("https://")]
    assert urls == [
        f"{kube.KATA_RAW}/3.7.0/tools/packaging/kata-deploy/kata-rbac/base/kata-rbac.yaml",
        f"{kube.KATA_RAW}/3.7.0/tools/packaging/kata-deploy/kata-deploy/base/kata-deploy.yaml",
    ]
    rollout = steps[-1]
    assert "rollout" in rollout.args and "daemonset/kata-deploy" in rollout.args
    assert "--timeout=600s" in rollout.args and rollout.timeout > 600
    assert all(s.timeout > 0 and s.what for s in steps)


# --------------------------------------------------------------------------- kubectl JSON

POD_PENDING = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "kata-test", "namespace": "default"},
    "spec": {"runtimeClassName": "kata-qemu", "nodeName": "minikube", "containers": []},
    "status": {
        "phase": "Pending",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {
                "type": "Ready",
                "status": "False",
                "reason": "ContainersNotReady",
                "message": "containers with unready status: [nginx]",
            },
        ],
        "containerStatuses": [
            {
                "name": "nginx",
                "ready": False,
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }
        ],
        "hostIP": "192.168.39.10",
    },
}

POD_RUNNING = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "kata-test", "namespace": "default", "uid": "9a8b"},
    "spec": {"runtimeClassName": "kata-qemu", "nodeName": "minikube"},
    "status": {
        "phase": "Running",
        "podIP": "10.244.0.7",
        "podIPs": [{"ip": "10.244.0.7"}],
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True"},
        ],
        "containerStatuses": [
            {"name": "nginx", "ready": True, "state": {"running": {"startedAt": "x"}}}
        ],
    },
}


def test_parse_pod_pending_and_running():
    pending = kube.parse_pod(json.dumps(POD_PENDING))
    assert (pending.phase, pending.ready, pending.pod_ip) == ("Pending", False, None)
    assert pending.waiting == "ContainerCreating" and pending.node == "minikube"
    assert pending.message == "containers with unready status: [nginx]"
    assert "Pending" in pending.describe() and "ContainerCreating" in pending.describe()
    running = kube.parse_pod(json.dumps(POD_RUNNING).encode())
    assert running.ready and running.phase == "Running"
    assert running.pod_ip == "10.244.0.7" and running.runtime_class == "kata-qemu"
    assert running.waiting is None


def test_parse_pods_list_and_errors():
    pods = kube.parse_pods(json.dumps({"kind": "List", "items": [POD_PENDING, POD_RUNNING]}))
    assert [p.ready for p in pods] == [False, True]
    with pytest.raises(KubeError, match="did not return JSON"):
        kube.parse_pod('Error from server (NotFound): pods "x" not found')
    with pytest.raises(KubeError, match="expected one pod, got 2"):
        kube.parse_pod({"kind": "List", "items": [POD_PENDING, POD_RUNNING]})
    with pytest.raises(KubeError, match="expected a Pod"):
        kube.parse_pod({"kind": "Node"})


def test_parse_nodes_and_daemonset():
    nodes_json = {
        "kind": "List",
        "items": [
            {
                "kind": "Node",
                "metadata": {
                    "name": "node-a",
                    "labels": {"kubernetes.io/hostname": "node-a", kube.KATA_NODE_LABEL: "true"},
                },
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": "10.0.0.1"},
                        {"type": "Hostname", "address": "node-a"},
                    ],
                    "conditions": [
                        {"type": "MemoryPressure", "status": "False"},
                        {"type": "Ready", "status": "True"},
                    ],
                },
            },
            {
                "kind": "Node",
                "metadata": {"name": "node-b"},
                "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]},
            },
        ],
    }
    a, b = kube.parse_nodes(json.dumps(nodes_json))
    assert (a.name, a.ready, a.internal_ip) == ("node-a", True, "10.0.0.1")
    assert a.labels[kube.KATA_NODE_LABEL] == "true"
    assert (b.name, b.ready, b.internal_ip, dict(b.labels)) == ("node-b", False, None, {})
    ds = kube.parse_daemonset(
        {
            "kind": "DaemonSet",
            "metadata": {"name": "kata-deploy"},
            "status": {"desiredNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1},
        }
    )
    assert ds.rolled_out and ds.name == "kata-deploy"
    assert not kube.parse_daemonset({"kind": "DaemonSet", "status": {}}).rolled_out


# --------------------------------------------------------------------------- waiting


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_wait_for_returns_the_first_truthy_result():
    clock = FakeClock()
    answers = iter([None, False, "ok"])
    got = kube.wait_for(
        lambda: next(answers), timeout=10, what="x", interval=1, clock=clock, sleep=clock.sleep
    )
    assert got == "ok" and clock.sleeps == [1, 1]


def test_wait_for_times_out_with_what_and_last_state():
    clock = FakeClock()
    with pytest.raises(WaitTimeout) as err:
        kube.wait_for(
            lambda: None,
            timeout=5,
            what="pod kata-test to be Ready",
            interval=2,
            state=lambda: "Pending, waiting (ContainerCreating)",
            clock=clock,
            sleep=clock.sleep,
        )
    assert str(err.value) == (
        "timed out after 5s waiting for pod kata-test to be Ready; "
        "last state: Pending, waiting (ContainerCreating)"
    )
    assert clock.now == pytest.approx(5)  # the last sleep is clipped to the deadline


def test_wait_for_retries_transient_errors_and_reports_them():
    clock = FakeClock()

    def check():
        raise ConnectionError("API server not up")

    with pytest.raises(WaitTimeout, match="last state: ConnectionError: API server not up"):
        kube.wait_for(
            check,
            timeout=3,
            what="nodes",
            transient=(ConnectionError,),
            clock=clock,
            sleep=clock.sleep,
        )
    with pytest.raises(ValueError):
        kube.wait_for(lambda: 1, timeout=0, what="x")


def test_pod_ready_check_fails_fast_on_hopeless_pods():
    check = kube.pod_ready_check(lambda: json.dumps(POD_RUNNING))
    assert check().pod_ip == "10.244.0.7"
    assert kube.pod_ready_check(lambda: json.dumps(POD_PENDING))() is None
    failed = json.loads(json.dumps(POD_PENDING))
    failed["status"]["phase"] = "Failed"
    with pytest.raises(KubeError, match="never be Ready"):
        kube.pod_ready_check(lambda: json.dumps(failed))()
    bad_image = json.loads(json.dumps(POD_PENDING))
    bad_image["status"]["containerStatuses"][0]["state"]["waiting"] = {
        "reason": "InvalidImageName",
        "message": "bad",
    }
    with pytest.raises(KubeError, match="InvalidImageName: bad"):
        kube.pod_ready_check(lambda: json.dumps(bad_image))()


# --------------------------------------------------------------------------- Kata config

KATA_TOML = """\
# Copyright (c) 2017-2019 Intel Corporation
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
# Enable debug output, e.g. enable_debug = true describes it
enable_debug = false
# Extra monitor: "hmp", "qmp" or "qmp-pretty"
#extra_monitor_socket = ""
machine_type = "q35"

[agent.kata]
enable_debug = false

[runtime]
enable_debug = false
internetworking_model="tcfilter"
"""


def test_enable_extra_monitor_sets_both_keys_in_the_qemu_section_only():
    out = kube.enable_extra_monitor(KATA_TOML)
    qemu, rest = out.split("[agent.kata]")
    assert "\nenable_debug = true\n" in qemu
    assert '\nextra_monitor_socket = "qmp"\n' in qemu
    assert "#extra_monitor_socket" not in qemu
    assert "# Enable debug output, e.g. enable_debug = true describes it" in qemu
    assert rest.count("enable_debug = false") == 2  # agent and runtime untouched
    assert kube.enable_extra_monitor(out) == out  # idempotent


def test_enable_extra_monitor_inserts_missing_keys_and_rejects_other_configs():
    out = kube.enable_extra_monitor('[hypervisor.qemu]\npath = "q"\n[runtime]\n')
    assert out.splitlines()[:3] == [
        "[hypervisor.qemu]",
        'extra_monitor_socket = "qmp"',
        "enable_debug = true",
    ]
    with pytest.raises(KubeError, match=r"no \[hypervisor.qemu\] section"):
        kube.enable_extra_monitor("[hypervisor.clh]\n")


def test_first_existing_script_picks_the_first_file(tmp_path):
    (tmp_path / "b").write_text("")
    (tmp_path / "c").write_text("")
    paths = [str(tmp_path / n) for n in ("a", "b", "c")]
    r = _run(["sh", "-c", kube.first_existing_script(paths)])
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'b'}\n"
    r = _run(["sh", "-c", kube.first_existing_script([str(tmp_path / "none")])])
    assert r.returncode == 0 and r.stdout == ""


# --------------------------------------------------------------------------- QMP discovery


def _unix_socket(path: Path, keep: list[socket.socket]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    keep.append(s)


def test_sandbox_listing_matches_discover_qmp_sockets():
    run_dir = Path(tempfile.mkdtemp(prefix="kv", dir="/tmp"))  # short: AF_UNIX path limit
    keep: list[socket.socket] = []
    try:
        both, plain, bare = run_dir / "aaa", run_dir / "bbb", run_dir / "ccc"
        for d in (both, plain, bare):
            d.mkdir()
            (d / "pid").write_text("4242\n")
        _unix_socket(both / "qmp.sock", keep)
        _unix_socket(both / "extra-monitor.sock", keep)
        _unix_socket(plain / "qmp.sock", keep)
        (bare / "qmp.sock").write_text("not a socket")
        (run_dir / "stray-file").write_text("")
        r = _run(["sh", "-c", kube.sandbox_list_script(run_dir)])
        assert r.returncode == 0, r.stderr
        parsed = kube.parse_sandbox_listing(r.stdout)
        assert parsed == discover_qmp_sockets(run_dir)
        assert [s.id for s in parsed] == ["aaa", "bbb"]
        assert parsed[0].preferred == both / "extra-monitor.sock"
        assert parsed[1].preferred == plain / "qmp.sock" and parsed[1].read_pid() == 4242
        empty = _run(["sh", "-c", kube.sandbox_list_script(run_dir / "missing")])
        assert empty.returncode == 0 and kube.parse_sandbox_listing(empty.stdout) == []
    finally:
        for s in keep:
            s.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _sb(sid: str) -> SandboxSockets:
    return SandboxSockets(sid, Path(f"/run/vc/vm/{sid}/qmp.sock"), None, None)


def test_pick_sandbox_by_id_or_the_only_one():
    one, two = _sb("aaaa1111"), _sb("bbbb2222")
    assert kube.pick_sandbox([one]) is one
    assert kube.pick_sandbox([one, two], "bbbb") is two
    assert kube.pick_sandbox([one, two], "bbbb2222ffff") is two
    with pytest.raises(KubeError, match="2 Kata sandboxes .*aaaa1111, bbbb2222"):
        kube.pick_sandbox([one, two])
    with pytest.raises(KubeError, match="no Kata sandbox with a QMP socket"):
        kube.pick_sandbox([])
    with pytest.raises(KubeError, match="no Kata sandbox with id cccc"):
        kube.pick_sandbox([one, two], "cccc")


def test_rc_marker_round_trip():
    r = _run(["sh", "-c", kube.with_rc_marker("echo hi; exit 3")])
    assert kube.split_rc_marker(r.stdout) == ("hi\n", 3)
    assert kube.split_rc_marker("a\r\n__katamaran_rc=0\r\n") == ("a\n", 0)
    assert kube.split_rc_marker("no marker") == ("no marker", None)


# --------------------------------------------------------------------------- QEMU replay

KATA_ARGV = [
    "/opt/kata/bin/qemu-system-x86_64",
    "-name", f"sandbox-{SID},debug-threads=on",
    "-uuid", "5c1f5a0e-0d6b-4d0e-9a53-6f2bd8c3a111",
    "-machine", "q35,accel=kvm,nvdimm=on",
    "-cpu", "host,pmu=off",
    "-qmp", "unix:fd=3,server=on,wait=off",
    "-qmp", f"unix:path={RUN}/extra-monitor.sock,server=on,wait=off",
    "-m", "2048M,slots=10,maxmem=9216M",
    "-device", "virtio-serial-pci,disable-modern=false,id=serial0",
    "-device", "virtconsole,chardev=charconsole0,id=console0",
    "-chardev", f"socket,id=charconsole0,path={RUN}/console.sock,server=on,wait=off",
    "-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on",
    "-object", "memory-backend-file,id=mem0,mem-path=/opt/kata/share/kata-containers/"
    "kata-containers.img,size=268435456,readonly=on",
    "-device", "vhost-vsock-pci,disable-modern=false,vhostfd=4,id=vsock-1234,guest-cid=1234",
    "-chardev", f"socket,id=char-fs0,path={RUN}/vhost-fs.sock",
    "-device", "vhost-user-fs-pci,chardev=char-fs0,tag=kataShared,queue-size=1024",
    "-netdev", "tap,id=network-0,vhost=on,vhostfds=5,fds=6",
    "-device", "driver=virtio-net-pci,netdev=network-0,mac=2e:1b:9c:3a:4f:01,mq=on",
    "-rtc", "base=utc,driftfix=slew,clock=host",
    "-vga", "none",
    "-no-user-config",
    "-nodefaults",
    "-nographic",
    "--no-reboot",
    "-object", "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
    "-numa", "node,memdev=dimm1",
    "-kernel", "/opt/kata/share/kata-containers/vmlinux.container",
    "-append", "tsc=reliable console=hvc0 quiet agent.log_vport=1025",
    "-pidfile", f"{RUN}/pid",
    "-D", f"{RUN}/qemu.log",
    "-smp", "1,cores=1,threads=1,sockets=4,maxcpus=4",
    "-daemonize",
]  # fmt: skip


def test_parse_cmdline_splits_on_nul():
    raw = ("\0".join(KATA_ARGV) + "\0").encode()
    assert kube.parse_cmdline(raw) == KATA_ARGV


def test_dest_qemu_argv_replays_the_source_waiting_for_the_migration():
    qmp = f"{RUN}/qmp.sock"
    dest = kube.dest_qemu_argv(KATA_ARGV, qmp_path=qmp)
    joined = shlex.join(dest)
    assert dest[0] == KATA_ARGV[0]
    assert dest[-2:] == ["-incoming", "defer"]
    assert "-daemonize" not in dest
    for key in ("fd=", "fds=", "vhostfd=", "vhostfds="):
        assert f",{key}" not in joined and f"tap,{key}" not in joined, key
    opts = kube.qemu_options(dest)
    qmps = [v for o, v in opts if o == "-qmp"]
    assert qmps == [
        f"unix:{qmp},server=on,wait=off",
        f"unix:path={RUN}/extra-monitor.sock,server=on,wait=off",
    ]
    (netdev,) = [v for o, v in opts if o == "-netdev"]
    assert netdev == "tap,id=network-0,vhost=on,ifname=tap0_kata,script=no,downscript=no"
    src = dict((o, v) for o, v in kube.qemu_options(KATA_ARGV) if o in ("-machine", "-m", "-smp"))
    assert {o: v for o, v in opts if o in src} == src  # migration needs identical machines
    assert kube.netdev_macs(dest) == kube.netdev_macs(KATA_ARGV) == ["2e:1b:9c:3a:4f:01"]
    assert ("-append", "tsc=reliable console=hvc0 quiet agent.log_vport=1025") in opts
    assert ("-no-reboot", None) in opts
    no_vhost = kube.dest_qemu_argv(KATA_ARGV, qmp_path=qmp, tap="tapX", vhost=False)
    assert "tap,id=network-0,ifname=tapX,script=no,downscript=no" in no_vhost


def test_replay_helpers():
    assert kube.runtime_dirs(KATA_ARGV) == [RUN]
    assert kube.vhost_user_fs_socket(KATA_ARGV) == f"{RUN}/vhost-fs.sock"
    assert not kube.uses_drive(KATA_ARGV, "drive-virtio-disk0")
    with_disk = [*KATA_ARGV, "-drive", "id=drive-virtio-disk0,file=/d.qcow2,if=none"]
    assert kube.uses_drive(with_disk, "drive-virtio-disk0")
    assert kube.migration_blockers(KATA_ARGV) == []
    ninep = [*KATA_ARGV, "-device", "virtio-9p-pci,fsdev=extra-9p-kataShared,mount_tag=x"]
    (blocker,) = kube.migration_blockers(ninep)
    assert "virtio-9p" in blocker and "virtio-fs" in blocker
    assert kube.split_opts("a=1,,2,b=3") == ["a=1,,2", "b=3"]


def test_virtiofsd_for_the_destination():
    src = [
        "/opt/kata/libexec/virtiofsd",
        "--syslog",
        "--cache=auto",
        f"--shared-dir=/run/kata-containers/shared/sandboxes/{SID}/shared",
        "--fd=3",
        "--thread-pool-size=1",
        "--announce-submounts",
    ]
    out = kube.virtiofsd_dest_argv(src, f"{RUN}/vhost-fs.sock")
    assert "--fd=3" not in out
    assert out[-2:] == [f"--socket-path={RUN}/vhost-fs.sock", "--migration-on-error=guest-error"]
    assert kube.virtiofsd_shared_dir(src) == f"/run/kata-containers/shared/sandboxes/{SID}/shared"
    assert kube.virtiofsd_shared_dir(["virtiofsd", "-o", "source=/s,cache=none"]) == "/s"
    assert kube.virtiofsd_dest_argv(["v", "--fd", "3", "--socket-path", "/x"], "/y") == [
        "v",
        "--socket-path=/y",
        "--migration-on-error=guest-error",
    ]


def test_node_networking_parsers():
    route = "default via 10.42.0.1 dev eth0 proto static \n10.42.0.0/24 dev eth0 scope link\n"
    assert kube.parse_default_gateway(route) == ("10.42.0.1", "eth0")
    assert kube.parse_default_gateway("10.42.0.0/24 dev eth0\n") is None
    addrs = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
        "3: enp0s4    inet 10.0.0.1/24 brd 10.0.0.255 scope global enp0s4\\  valid_lft forever\n"
        "5: cni0    inet 10.42.0.1/24 brd 10.42.0.255 scope global cni0\\   valid_lft forever\n"
    )
    assert kube.iface_with_address(addrs, "10.42.0.1") == "cni0"
    assert kube.iface_with_address(addrs, "10.0.0.1") == "enp0s4"
    assert kube.iface_with_address(addrs, "10.0.0.9") is None
    cmds = kube.dest_tap_commands("tap0_kata", "ee:11:22:33:44:55")
    assert any("tuntap add dev tap0_kata mode tap" in c for c in cmds)
    assert "ip link set dev tap0_kata address ee:11:22:33:44:55" in cmds
    assert "sysctl -qw net.ipv4.conf.tap0_kata.proxy_arp=1" in cmds
    assert not any("ip addr add" in c for c in cmds)  # the gateway IP stays node A's


def test_bundle_is_self_contained(tmp_path):
    bundle = kube.build_bundle(tmp_path / "b.tgz")
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        # filter= is 3.11.4+ (Debian 12 has 3.11.2); the archive is the one built just above
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path / "x", **safe)
    for required in ("katamaran/__init__.py", "qemu/qmp/__init__.py", "pyroute2/__init__.py"):
        assert required in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # -S: no site-packages, so katamaran and its deps can only come from the bundle.
    r = _run(
        [sys.executable, "-S", "-m", "katamaran", "-mode", "bogus"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path / "x")},
    )
    assert r.returncode == 2 and "invalid mode" in r.stderr, r.stderr
    r = _run(
        [sys.executable, "-S", "-c", "import katamaran.dest, qemu.qmp, pyroute2; print('ok')"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path / "x")},
    )
    assert r.stdout.strip() == "ok", r.stderr


# --------------------------------------------------------------------------- prereq probes


def _sysfs(root: Path, intel: str | None = None, amd: str | None = None) -> Path:
    for module, value in (("kvm_intel", intel), ("kvm_amd", amd)):
        if value is not None:
            p = root / "sys/module" / module / "parameters"
            p.mkdir(parents=True)
            (p / "nested").write_text(value + "\n")
    return root


@pytest.mark.parametrize(("intel", "amd"), [("Y", None), ("1", None), (None, "1"), ("N", "1")])
def test_nested_virtualization_enabled(tmp_path, intel, amd):
    assert prereq.nested_virtualization(_sysfs(tmp_path, intel, amd)) is None


def test_nested_virtualization_messages(tmp_path):
    missing = prereq.nested_virtualization(tmp_path)
    assert missing == (
        "nested virtualization unavailable: neither /sys/module/kvm_intel/parameters/nested "
        "nor /sys/module/kvm_amd/parameters/nested exists (kvm_intel/kvm_amd not loaded)"
    )
    off = prereq.nested_virtualization(_sysfs(tmp_path / "r", intel="N"))
    assert off == (
        "nested virtualization is disabled (/sys/module/kvm_intel/parameters/nested is N): "
        "enable it (e.g. modprobe kvm_intel nested=1)"
    )


def test_kvm_probe_messages(tmp_path):
    assert prereq.working_kvm(lambda: (True, "SeaBIOS POST completed")) is None
    reason = prereq.working_kvm(lambda: (False, "QEMU error: failed to set MSR 0x10a"))
    assert reason == "KVM is not usable here (QEMU error: failed to set MSR 0x10a)"
    root = _sysfs(tmp_path, intel="Y")
    assert prereq.nested_kvm(root, lambda: (False, "x")) == "KVM is not usable here (x)"
    assert prereq.nested_kvm(root, lambda: (True, "ok")) is None


def test_programs_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prereq.minikube() == (
        "`minikube` not found on PATH (install it from https://minikube.sigs.k8s.io)"
    )
    assert prereq.kubectl() == "`kubectl` not found on PATH (install kubectl)"
    for name in ("minikube", "kubectl"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    assert prereq.minikube() is None and prereq.kubectl() is None


def test_internet_is_declared_not_probed(monkeypatch):
    monkeypatch.delenv(prereq.INTERNET_ENV, raising=False)
    reason = prereq.internet()
    assert reason is not None
    assert "KATAMARAN_INTERNET=1" in reason and "not probed" in reason
    assert "get.k3s.io" in reason and "docker.io" in reason
    assert prereq.internet({"KATAMARAN_INTERNET": "1"}) is None
    assert prereq.internet({"KATAMARAN_INTERNET": "0"}) is not None


def test_kata_local(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(prereq, "KATA_RUNTIME", str(tmp_path / "kata-runtime"))
    assert prereq.kata_local() == (
        f"Kata Containers not installed ({tmp_path / 'kata-runtime'} missing and "
        "containerd-shim-kata-v2 not on PATH)"
    )
    shim = tmp_path / "containerd-shim-kata-v2"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    assert prereq.kata_local() is None


def test_minikube_flow_lists_every_missing_prerequisite(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(prereq.INTERNET_ENV, raising=False)
    monkeypatch.setattr(prereq, "nested_kvm", lambda: "nested virtualization unavailable: x")
    reason = prereq.minikube_flow()
    parts = reason.split("; ")
    assert parts[0].startswith("`minikube` not found")
    assert parts[1].startswith("`kubectl` not found")
    assert parts[2] == "nested virtualization unavailable: x"
    assert parts[3].startswith("internet access")


class LocalRunner:
    """Runs node checks with this host's sh, with a controlled PATH."""

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, cmd: str, check: bool = False, timeout: float = 60):
        return _run(["sh", "-c", cmd], env={"PATH": self.path})


def test_node_checks_run_for_real(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sh_path = f"{bin_dir}:/usr/bin:/bin"
    runner = LocalRunner(sh_path)
    if Path(prereq.KATA_RUNTIME).exists() or Path(prereq.KATA_SHIM_OPT).exists():
        pytest.skip("Kata is installed on this machine: the 'missing' case cannot be shown")
    reasons = prereq.node_reasons("node-a", runner, ["no-such-program-xyz"])
    assert f"Kata Containers not installed on node-a ({prereq.KATA_RUNTIME}" in reasons[0]
    assert reasons[-1] == (
        "`no-such-program-xyz` not found on node-a (`command -v no-such-program-xyz` failed)"
    )
    if shutil.which("python3", path=sh_path):
        out = runner.run(prereq.PYTHON_NODE_CHECK).stdout
        assert out.startswith("python=3.")
    shim = bin_dir / "containerd-shim-kata-v2"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    out = runner.run(prereq.KATA_NODE_CHECK).stdout
    assert prereq.kata_node_reason("node-a", out) is None


def test_zipapp_runs_with_nothing_but_python(tmp_path):
    """The guide's "copy the binary": katamaran.pyz runs with its deps from inside itself."""
    app = kube.build_zipapp(tmp_path / "katamaran.pyz")
    env = {"PATH": os.environ.get("PATH", "")}
    # -I -S: no site-packages, no PYTHONPATH: everything must come from the archive
    r = _run([sys.executable, "-I", "-S", str(app), "-mode", "bogus"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and 'invalid mode "bogus"' in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    where = (
        "import sys; sys.path.insert(0, sys.argv[1]); import katamaran.dest, qemu.qmp, pyroute2;"
    )
    where += "print(katamaran.dest.__file__, qemu.qmp.__file__, pyroute2.__file__)"
    r = _run([sys.executable, "-I", "-S", "-c", where, str(app)], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert all(f.startswith(f"{app}/") for f in r.stdout.split()), r.stdout
    # built and run by one Python: each module comes compiled, none is compiled per run
    # (another version falls back to the .py: test_zipapp_on_a_real_cpython_310)
    assert all(f.endswith(".pyc") for f in r.stdout.split()), r.stdout
    r = _run([str(app), "--version"], cwd=tmp_path, env=env)  # #!/usr/bin/env python3
    assert r.returncode == 0 and r.stdout.startswith("katamaran "), r.stdout + r.stderr


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("python=3.12\n", None),
        ("python=3.11\n", None),
        ("python=3.10\n", None),  # Ubuntu 22.04, the guide's node image
        ("python=3.9\n", "python3 on node-b is 3.9; katamaran needs python3 >= 3.10 there"),
        ("python=none\n", "python3 not found on node-b (katamaran needs python3 >= 3.10 there)"),
        ("garbage", "cannot tell python3's version on node-b (output: 'garbage')"),
    ],
)
def test_python_node_reason(output, expected):
    assert prereq.python_node_reason("node-b", output) == expected


# --------------------------------------------------------------------------- k3s pieces


def test_k3s_install_commands_use_the_private_link():
    server = k3s.server_install_command("v1.30.6+k3s1", "10.0.0.1", "enp0s4")
    words = shlex.split(server)
    assert words[:3] == ["curl", "-sfL", "https://get.k3s.io"]
    assert "INSTALL_K3S_VERSION=v1.30.6+k3s1" in words
    exec_arg = next(w for w in words if w.startswith("INSTALL_K3S_EXEC="))
    assert "server --node-ip 10.0.0.1" in exec_arg and "--flannel-iface enp0s4" in exec_arg
    agent = shlex.split(k3s.agent_install_command("v1", "10.0.0.1", "K::tok", "10.0.0.2", "e4"))
    assert "K3S_URL=https://10.0.0.1:6443" in agent and "K3S_TOKEN=K::tok" in agent
    assert "INSTALL_K3S_EXEC=agent --node-ip 10.0.0.2 --flannel-iface e4" in agent


def test_k3s_containerd_template_adds_the_kata_handler():
    text = k3s.containerd_template(k3s.KATA_K3S_CONFIG, "/opt/kata/bin/containerd-shim-kata-v2")
    assert text.startswith('{{ template "base" . }}\n')
    assert '.runtimes."kata-qemu"]' in text and 'runtime_type = "io.containerd.kata.v2"' in text
    assert 'runtime_path = "/opt/kata/bin/containerd-shim-kata-v2"' in text
    assert f'ConfigPath = "{k3s.KATA_K3S_CONFIG}"' in text
    assert "runtime_path" not in k3s.containerd_template("/c.toml", None)


def test_k3s_instructions_name_the_pod_and_both_katamaran_modes():
    pod = kube.parse_pod(POD_RUNNING)
    text = k3s.instructions(pod, "10.0.0.1", "10.0.0.2")
    assert "10.244.0.7" in text
    assert "-mode dest" in text and "-tap tap0_kata" in text
    assert "-mode source" in text and "-dest-ip 10.0.0.2 -vm-ip 10.244.0.7" in text
    assert "/run/vc/vm/*/extra-monitor.sock" in text


def test_node_address_overrides():
    assert k3s.node_address("a", {}) == ("localhost", 2222)
    assert k3s.node_address("b", {"KATAMARAN_NODE_B_PORT": "3000"}) == ("localhost", 3000)
    assert k3s.node_address("a", {"KATAMARAN_NODE_HOST": "h"}) == ("h", 2222)
    with pytest.raises(k3s.LabError, match="KATAMARAN_NODE_A_PORT must be a port number"):
        k3s.node_address("a", {"KATAMARAN_NODE_A_PORT": "x"})


# --------------------------------------------------------------------------- front-ends


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [[], ["bogus"], ["setup", "extra"]])
def test_k3s_e2e_sh_usage_errors(args):
    r = _run(["bash", str(REPO / "testenv" / "k3s-e2e.sh"), *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Usage: ./testenv/k3s-e2e.sh setup|status|teardown" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args", [[], ["bogus"]])
def test_k3s_cli_usage_errors(args):
    r = _run([sys.executable, "-m", "pytest_katamaran.kube.k3s", *args])
    assert r.returncode == 2 and "usage: k3s-e2e.sh" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--nope"], ["--keep", "x"]])
def test_minikube_test_sh_usage_errors(args):
    r = _run(["bash", str(REPO / "testenv" / "minikube-test.sh"), *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Usage: ./testenv/minikube-test.sh [--keep]" in r.stderr


def _fake_python(tmp_path: Path) -> dict[str, str]:
    """A python (testenv/lib.sh's KATAMARAN_PYTHON) that prints its args and the keep variable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\necho "args: $*"\necho "keep: ${KATAMARAN_KEEP_CLUSTER:-unset}"\n')
    fake.chmod(0o755)
    env = _env(KATAMARAN_PYTHON=str(fake))
    env.pop("KATAMARAN_KEEP_CLUSTER", None)
    return env


@pytest.mark.parametrize(("args", "keep"), [([], "unset"), (["--keep"], "1")])
def test_minikube_test_sh_runs_the_pytest_module(tmp_path, args, keep):
    r = _run(
        ["bash", str(REPO / "testenv" / "minikube-test.sh"), *args], env=_fake_python(tmp_path)
    )
    assert r.returncode == 0, r.stderr
    assert "args: -m pytest tests/e2e/test_minikube.py -v" in r.stdout
    assert f"keep: {keep}" in r.stdout


@pytest.mark.parametrize("command", ["setup", "status", "teardown"])
def test_k3s_e2e_sh_runs_the_python_cli(tmp_path, command):
    r = _run(["bash", str(REPO / "testenv" / "k3s-e2e.sh"), command], env=_fake_python(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"args: -m pytest_katamaran.kube.k3s {command}" in r.stdout


def test_k3s_status_against_an_unreachable_node_is_one_line(tmp_path):
    port = _closed_port()
    env = _env(KATAMARAN_NODE_A_PORT=str(port), KATAMARAN_TESTENV_DIR=str(tmp_path))
    r = _run([sys.executable, "-m", "pytest_katamaran.kube.k3s", "status"], env=env, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"localhost:{port}" in lines[0] and "./testenv/start-node-a.sh" in lines[0]
    assert "Traceback" not in r.stderr


def test_k3s_e2e_sh_reports_node_b_unreachable(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        a_port = listener.getsockname()[1]
        b_port = _closed_port()
        env = _env(
            KATAMARAN_NODE_HOST="127.0.0.1",
            KATAMARAN_NODE_A_PORT=str(a_port),
            KATAMARAN_NODE_B_PORT=str(b_port),
            KATAMARAN_TESTENV_DIR=str(tmp_path),
        )
        r = _run(["bash", str(REPO / "testenv" / "k3s-e2e.sh"), "status"], env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"k3s-e2e: node-b is not reachable at 127.0.0.1:{b_port} (Connection refused); "
        "start it with ./testenv/start-node-b.sh"
    )


@pytest.mark.qemu
def test_replayed_argv_starts_a_real_qemu_waiting_for_the_migration():
    """The transformation is accepted by a real QEMU: tap pre-created, QMP at our path."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or shutil.which("unshare") is None:
        pytest.skip("qemu-system-x86_64 or unshare not installed")
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun (tap device in a private netns)")
    run_dir = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp")) / "sbx"
    src = [
        qemu, "-name", "sandbox-sbx", "-machine", "pc,accel=tcg", "-m", "64",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-qmp", "unix:fd=3,server=on,wait=off",
        "-chardev", f"socket,id=charconsole0,path={run_dir}/console.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=serial0",
        "-device", "virtconsole,chardev=charconsole0,id=console0",
        "-netdev", "tap,id=network-0,vhost=on,vhostfds=5,fds=6",
        "-device", "driver=virtio-net-pci,netdev=network-0,mac=2e:1b:9c:3a:4f:01",
        "-pidfile", f"{run_dir}/pid", "-daemonize",
    ]  # fmt: skip
    qmp_path = f"{run_dir}/qmp.sock"
    dest = kube.dest_qemu_argv(src, qmp_path=qmp_path, vhost=os.path.exists("/dev/vhost-net"))
    for d in kube.runtime_dirs(dest):
        Path(d).mkdir(parents=True, exist_ok=True)
    script = "; ".join(kube.dest_tap_commands("tap0_kata", "ee:11:22:33:44:55"))
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f"set -e; {script}; exec {shlex.join(dest)}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    from pytest_katamaran.lab.local import accepts, qmp

    try:
        kube.wait_for(
            lambda: accepts(Path(qmp_path)) or proc.poll() is not None,
            timeout=30,
            what=f"QMP socket {qmp_path}",
            interval=0.05,
        )
        assert proc.poll() is None, f"QEMU exited {proc.returncode}: {proc.stdout.read()}"
        assert qmp(Path(qmp_path), "query-status")["status"] == "inmigrate"
        assert Path(f"{run_dir}/pid").read_text().strip() == str(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        shutil.rmtree(run_dir.parent, ignore_errors=True)
