#!/usr/bin/env python3
"""The `podman run` arguments that give a container what the rendered DaemonSet gives meshd's pod:
host networking (here: the lab node's network namespace), the security context (user,
capabilities, no privilege escalation, read-only root, seccomp), the volumes at their mount
paths, the environment and the command. The lab runs meshd from its image with these
(scripts/lab.sh --from-image), so a manifest change that breaks the pod breaks the lab.

usage: kubectl kustomize deploy/overlays/m1 | scripts/pod-to-podman.py --netns NAME \\
           --volume NAME=HOST_DIR ... [--probes]
  --netns NAME        the network namespace standing in for the node (hostNetwork: true)
  --volume NAME=DIR   the host directory holding volume NAME's files (a projected ConfigMap and
                      Secret, an emptyDir); hostPath volumes map to their own path
  --probes            print the container's HTTP probes instead ("liveness PORT PATH" lines)
Prints one argument per line (the image is not included). Anything in the pod spec it cannot
model is an error naming the field, rather than silently left out.
"""
import sys

import yaml

# securityContext fields and what podman does for them
KNOWN_SECURITY = {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsUser",
                  "runAsGroup", "runAsNonRoot", "capabilities", "seccompProfile"}
# container fields that need nothing from podman (scheduling, kubelet-side) or are handled below
KNOWN_CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports",
                   "livenessProbe", "readinessProbe", "startupProbe", "resources",
                   "securityContext", "volumeMounts"}


def fail(message):
    sys.exit(f"pod-to-podman: {message}")


def daemonset(documents):
    found = [d for d in documents if d and d.get("kind") == "DaemonSet"]
    if len(found) != 1:
        fail(f"expected one DaemonSet in the rendered manifests, found {len(found)}")
    return found[0]


def named_port(container, port):
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    if isinstance(port, int):
        return port
    fail(f"probe port {port!r} is not one of the container's ports")


def probes(container):
    lines = []
    for kind in ("liveness", "readiness", "startup"):
        probe = container.get(f"{kind}Probe")
        if not probe:
            continue
        http = probe.get("httpGet")
        if not http:
            fail(f"{kind}Probe: only httpGet probes are modelled")
        lines.append(f"{kind} {named_port(container, http['port'])} {http.get('path', '/')}")
    return lines


def security(context):
    unknown = set(context) - KNOWN_SECURITY
    if unknown:
        fail(f"securityContext.{sorted(unknown)[0]} is not modelled; teach scripts/pod-to-podman.py")
    if context.get("privileged"):
        fail("securityContext.privileged: true would be --privileged; the DaemonSet must not need it")
    args = []
    user, group = context.get("runAsUser"), context.get("runAsGroup")
    if user is not None:
        args.append(f"--user={user}:{group if group is not None else user}")
    if context.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    if context.get("readOnlyRootFilesystem"):
        # As in a pod: nothing writable but the volumes (podman would add tmpfs on /run, /tmp).
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = context.get("capabilities", {})
    for cap in caps.get("drop", []):
        args.append(f"--cap-drop={cap}")
    for cap in caps.get("add", []):
        args.append(f"--cap-add={cap}")
    seccomp = context.get("seccompProfile", {}).get("type")
    if seccomp not in (None, "RuntimeDefault"):
        fail(f"seccompProfile.type {seccomp!r}: only RuntimeDefault (podman's default profile) is modelled")
    return args


def volumes(pod, container, sources):
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    args = []
    for mount in container.get("volumeMounts", []):
        name, path = mount["name"], mount["mountPath"]
        if "subPath" in mount:
            fail(f"volumeMounts {name}: subPath is not modelled")
        volume = by_name.get(name) or fail(f"volumeMount {name} has no volume")
        mode = "ro" if mount.get("readOnly") else "rw"
        if "hostPath" in volume:
            host = volume["hostPath"]
            if host.get("type") == "CharDevice":
                args.append(f"--device={host['path']}:{path}")
            else:
                args.append(f"--volume={host['path']}:{path}:{mode}")
        elif "projected" in volume or "configMap" in volume or "secret" in volume or "emptyDir" in volume:
            if name not in sources:
                fail(f"volume {name} ({path}) needs --volume {name}=DIR")
            args.append(f"--volume={sources[name]}:{path}:{mode}")
        else:
            fail(f"volume {name}: only hostPath, projected, configMap, secret and emptyDir are modelled")
    return args


def main():
    argv = sys.argv[1:]
    netns, sources, want_probes = None, {}, False
    while argv:
        flag = argv.pop(0)
        if flag == "--netns":
            netns = argv.pop(0)
        elif flag == "--volume":
            name, _, directory = argv.pop(0).partition("=")
            sources[name] = directory
        elif flag == "--probes":
            want_probes = True
        else:
            fail(f"unknown argument {flag!r}; see the usage at the top of {sys.argv[0]}")
    ds = daemonset(yaml.safe_load_all(sys.stdin))
    pod = ds["spec"]["template"]["spec"]
    containers = pod.get("containers", [])
    if len(containers) != 1 or pod.get("initContainers"):
        fail("the pod must have exactly one container and no init containers to be modelled")
    container = containers[0]
    unknown = set(container) - KNOWN_CONTAINER
    if unknown:
        fail(f"container field {sorted(unknown)[0]} is not modelled; teach scripts/pod-to-podman.py")
    if want_probes:
        print("\n".join(probes(container)))
        return
    if not pod.get("hostNetwork"):
        fail("the pod is not hostNetwork: the lab models a node's network namespace only")
    if netns is None:
        fail("--netns NAME is needed (the namespace standing in for the node)")
    args = [f"--network=ns:/run/netns/{netns}"]
    args += security(container.get("securityContext", {}))
    args += volumes(pod, container, sources)
    for env in container.get("env", []):
        if "value" not in env:
            fail(f"env {env['name']}: only plain values are modelled")
        args.append(f"--env={env['name']}={env['value']}")
    command = container.get("command", []) + container.get("args", [])
    if command:
        args.append(f"--entrypoint={command[0]}")
    args.append("--")
    print("\n".join(args))
    # The rest of the command follows the image name: printed after a separator line.
    print("\n".join(command[1:]))


if __name__ == "__main__":
    main()
