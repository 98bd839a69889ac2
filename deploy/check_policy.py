#!/usr/bin/env python3
"""meshd's deployment policy, checked on rendered manifests (what `kubectl kustomize` prints).

Schema validity is kubernetes-validate's job (deploy/validate.sh runs it); this script checks what a
schema cannot say:

- the meshd DaemonSet runs in the node's network (hostNetwork: true);
- no container is privileged or may escalate privileges, and each drops ALL capabilities and adds
  exactly NET_ADMIN;
- no RBAC rule holds "*" in apiGroups, resources or verbs;
- no Secret is rendered (the private key is created by hand, never kept in the tree);
- every CustomResourceDefinition is apiextensions.k8s.io/v1, named plural.group, has exactly one
  storage version, and a structural schema (every node typed; properties only on objects, items on
  arrays).

Usage: check_policy.py FILE...  Prints one line per violation (naming file, object and field) and
exits 1 if there is any, else prints a summary and exits 0.
"""

import sys

import yaml

POD_TEMPLATE_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"}
RBAC_RULE_KINDS = {"Role", "ClusterRole"}
RBAC_RULE_FIELDS = ("apiGroups", "resources", "verbs")
# Schema nodes that may go without a type in a structural schema.
UNTYPED_ALLOWED = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def name_of(obj):
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def pod_spec_of(obj):
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}
    if obj.get("kind") in POD_TEMPLATE_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def check_pod_spec(where, obj, spec):
    problems = []
    if obj.get("kind") == "DaemonSet" and spec.get("hostNetwork") is not True:
        problems.append(
            f"{where}: spec.template.spec.hostNetwork must be true (meshd routes in the node's network namespace)"
        )
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            at = f"{where}: {group}[{container.get('name', '?')}].securityContext"
            ctx = container.get("securityContext") or {}
            if ctx.get("privileged") is True:
                problems.append(f"{at}.privileged is true; remove it: meshd needs only NET_ADMIN")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}.allowPrivilegeEscalation must be false")
            caps = ctx.get("capabilities") or {}
            if caps.get("add") != ["NET_ADMIN"]:
                problems.append(
                    f"{at}.capabilities.add is {caps.get('add')}; it must be exactly [NET_ADMIN]"
                )
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{at}.capabilities.drop must contain ALL")
    return problems


def check_rbac(where, obj):
    problems = []
    for i, rule in enumerate(obj.get("rules") or []):
        for field in RBAC_RULE_FIELDS:
            if "*" in (rule.get(field) or []):
                problems.append(
                    f'{where}: rules[{i}].{field} contains "*"; list the {field} meshd needs instead'
                )
    return problems


def check_schema(where, path, node):
    """Structural-schema rules of apiextensions.k8s.io/v1, on one node and its children."""
    problems = []
    if not isinstance(node, dict):
        return [f"{where}: {path} is not a schema object"]
    kind = node.get("type")
    if kind is None and not any(node.get(k) for k in UNTYPED_ALLOWED):
        problems.append(f"{where}: {path} has no type; every schema node needs one")
    if "properties" in node and kind != "object":
        problems.append(f"{where}: {path} has properties but type {kind!r}; use type: object")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: {path} has both properties and additionalProperties; keep one")
    if kind == "array" and "items" not in node:
        problems.append(f"{where}: {path} is an array without items; describe its items")
    for name, child in (node.get("properties") or {}).items():
        problems += check_schema(where, f"{path}.properties.{name}", child)
    if isinstance(node.get("additionalProperties"), dict):
        problems += check_schema(where, f"{path}.additionalProperties", node["additionalProperties"])
    if "items" in node:
        problems += check_schema(where, f"{path}.items", node["items"])
    return problems


def check_crd(where, obj):
    if obj.get("apiVersion") != "apiextensions.k8s.io/v1":
        return [f"{where}: apiVersion is {obj.get('apiVersion')!r}; write apiextensions.k8s.io/v1"]
    spec = obj.get("spec") or {}
    problems = []
    expected = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
    if (obj.get("metadata") or {}).get("name") != expected:
        problems.append(f"{where}: metadata.name must be {expected} (plural.group)")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage") is True) != 1:
        problems.append(f"{where}: exactly one version must have storage: true")
    for v in versions:
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        at = f"versions[{v.get('name', '?')}].schema.openAPIV3Schema"
        if schema is None:
            problems.append(f"{where}: {at} is missing; every version needs a structural schema")
        else:
            problems += check_schema(where, at, schema)
    return problems


def check_object(source, obj):
    where = f"{source}: {name_of(obj)}"
    kind = obj.get("kind")
    problems = []
    spec = pod_spec_of(obj)
    if spec is not None:
        problems += check_pod_spec(where, obj, spec)
    if kind in RBAC_RULE_KINDS:
        problems += check_rbac(where, obj)
    if kind == "Secret":
        problems.append(
            f"{where}: a Secret is rendered; the private key must be created by hand (docs/homelab.md), never kept in deploy/"
        )
    if kind == "CustomResourceDefinition":
        problems += check_crd(where, obj)
    return problems


def main(paths):
    if not paths:
        print("usage: check_policy.py FILE...  (rendered manifests, e.g. from kubectl kustomize)", file=sys.stderr)
        return 2
    problems = []
    objects = 0
    daemonsets = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            print(f"{path}: cannot read as YAML ({e}); render it with kubectl kustomize first", file=sys.stderr)
            return 1
        for obj in docs:
            objects += 1
            daemonsets += obj.get("kind") == "DaemonSet"
            problems += check_object(path, obj)
    if daemonsets == 0:
        problems.append(f"{' '.join(paths)}: no DaemonSet found; render an overlay that includes deploy/base")
    for p in problems:
        print(f"policy violation: {p}")
    if problems:
        print(f"check_policy: {len(problems)} violation(s) in {objects} object(s)")
        return 1
    print(f"check_policy: {objects} object(s) in {len(paths)} file(s) pass")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
